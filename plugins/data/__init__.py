"""Built-in data sources: the embedded synthetic federation, generated question-level
response logs, four real education datasets read from files under the run's data root
(``m3tfed run --data DIR``), and ``multi``, which combines sources into one federation.
See docs/data.md."""

from m3tfed import hookimpl

from . import crohme, ellipse, multi, oulad, question_logs, synthetic, uci
from .crohme import CROHME
from .ellipse import Ellipse
from .multi import MultiSource
from .oulad import OULAD
from .question_logs import QuestionLogs
from .synthetic import SyntheticEducation
from .uci import UCIStudent

__all__ = ["CROHME", "OULAD", "Ellipse", "MultiSource", "QuestionLogs", "SyntheticEducation", "UCIStudent"]


@hookimpl
def register_data_sources(register):
    for module in (synthetic, question_logs, uci, oulad, ellipse, crohme, multi):  # each spec sits beside its source
        register(module.SPEC)
