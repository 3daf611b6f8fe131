"""Built-in data sources: the embedded synthetic federation, four real education
datasets read from files under the run's data root (``m3tfed run --data DIR``), and
``multi``, which combines sources into one federation. See docs/data.md."""

from m3tfed import DataSourceSpec, hookimpl

from .crohme import CROHME
from .ellipse import Ellipse
from .multi import MultiSource
from .oulad import OULAD
from .synthetic import SyntheticEducation
from .uci import UCIStudent


@hookimpl
def register_data_sources(register):
    register(
        DataSourceSpec(
            name="synthetic",
            build=SyntheticEducation,
            version="0.1.0",
            license="Apache-2.0",
            modalities=("tabular", "text", "interactions", "image"),
            tasks=("grade", "dropout", "essay_score", "next_response", "symbol"),
            description="embedded synthetic education federation, generated in-process",
        )
    )
    # The loaders' code is Apache-2.0; each dataset keeps its own licence (docs/data.md).
    common = {"version": "0.1.0", "license": "Apache-2.0"}
    register(DataSourceSpec(name="uci_student", build=UCIStudent, modalities=("tabular",), tasks=("g3", "pass"), description="UCI Student Performance (CC BY 4.0 data): school x subject institutions; G3 and pass/fail", **common))
    register(DataSourceSpec(name="oulad", build=OULAD, modalities=("tabular", "interactions"), tasks=("final_result", "withdrawal"), description="Open University Learning Analytics (CC BY 4.0 data): module or region institutions; final result, withdrawal; assessment sequences", **common))
    register(DataSourceSpec(name="ellipse", build=Ellipse, modalities=("text",), tasks=("essay_scores",), description="ELLIPSE learner essays (CC BY-NC-SA 4.0 data): grade or prompt institutions; seven analytic scores", **common))
    register(DataSourceSpec(name="crohme", build=CROHME, modalities=("image",), tasks=("symbols",), description="CROHME handwritten maths (CC BY-NC-SA 3.0 data): five universities; multi-label symbol presence", **common))
    register(DataSourceSpec(name="multi", build=MultiSource, description="several data sources combined into one federation, each institution served by the source that names it", **common))
