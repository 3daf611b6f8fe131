"""Contract checks (m3tfed.contracts) and the author's kit (m3tfed.testing) on
deliberately broken plugins: each error must name the plugin, its package and what was
expected against what came back."""

import pytest
import torch
from m3tfed import ContractError, EncoderSpec, ExpertSpec, RouterSpec, Routing, TaskSpec, Tokens
from m3tfed.contracts import (
    build_checked,
    check_encoder_module,
    check_expert_module,
    check_param_count,
    check_router_module,
    check_task_module,
    check_tokens,
)
from m3tfed.experts import SwiGLUExpert
from m3tfed.experts.tasks import RegressionHead
from m3tfed.testing import PluginCheckFailed, check_encoder, check_expert, check_router, check_task
from torch import nn


def expert_spec(build, name="bad_expert", params=None):
    return ExpertSpec(name=name, build=build, version="1.0", license="MIT", params=params, package="acme-experts")


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ContractError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert info.value.plugin in msg and info.value.package in msg
    return msg


# -- experts -----------------------------------------------------------------------------


def test_param_count_mismatch_names_plugin_package_and_numbers():
    spec = expert_spec(SwiGLUExpert, name="swiglu_fork", params=1000)
    msg = error(check_param_count, spec, SwiGLUExpert(256))
    assert msg.startswith("expert plugin 'swiglu_fork' (from acme-experts): ")
    assert "declares params=1,000 but build(d_model=256) with default options has 523,776 parameters" in msg
    assert "off by +522,776" in msg
    check_param_count(expert_spec(SwiGLUExpert, params=523_776), SwiGLUExpert(256))
    check_param_count(expert_spec(SwiGLUExpert, params=None), SwiGLUExpert(256))  # undeclared: skipped


class WrongWidth(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.lin = nn.Linear(d_model, d_model + 1)

    def forward(self, x):
        return self.lin(x)


def test_wrong_shape_expert_error_text():
    spec = expert_spec(WrongWidth)
    msg = error(check_expert_module, spec, WrongWidth(8), 8)
    assert msg == (
        "expert plugin 'bad_expert' (from acme-experts): output must be [N, d_model] = [6, 8] "
        "for input [6, 8], got [6, 9]"
    )


class Double(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.lin = nn.Linear(d_model, d_model)

    def forward(self, x):
        return self.lin(x).double()


class MixesTokens(nn.Module):
    """Subtracts the batch mean: fine in a dense FFN, wrong for an expert."""

    def __init__(self, d_model):
        super().__init__()
        self.lin = nn.Linear(d_model, d_model)

    def forward(self, x):
        return self.lin(x - x.mean(0))


def test_expert_dtype_and_token_independence():
    assert "output dtype must match the input's torch.float32, got torch.float64" in error(
        check_expert_module, expert_spec(Double), Double(8), 8
    )
    assert "must treat tokens independently" in error(check_expert_module, expert_spec(MixesTokens), MixesTokens(8), 8)


def test_build_errors_name_the_options():
    msg = error(build_checked, expert_spec(SwiGLUExpert), 8, width=3)
    assert "build(8, width=3) raised TypeError" in msg
    msg = error(build_checked, expert_spec(lambda d: "not a module"), 8)
    assert "build(8) must return a torch.nn.Module, got str" in msg


def test_checks_leave_rng_and_mode_alone():
    module = SwiGLUExpert(8).train()
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    check_expert_module(expert_spec(SwiGLUExpert), module, 8)
    assert torch.equal(torch.rand(3), expected)
    assert module.training


# -- encoders ----------------------------------------------------------------------------


class FakeEncoder(nn.Module):
    def __init__(self, d_model, tokens=None, mask=None):
        super().__init__()
        self.d, self.tokens, self.mask = d_model, tokens, mask
        self.w = nn.Parameter(torch.ones(()))

    def example_input(self, batch_size, generator=None):
        return torch.randn(batch_size, 3, self.d, generator=generator)

    def forward(self, x):
        tokens = x * self.w if self.tokens is None else self.tokens
        mask = torch.ones(x.shape[:2], dtype=torch.bool) if self.mask is None else self.mask
        return Tokens(tokens, mask)


ENC = EncoderSpec(name="fake_enc", build=FakeEncoder, modality="text", version="1", license="MIT", package="acme-enc")


@pytest.mark.parametrize(
    ("tokens", "mask", "expected"),
    [
        (torch.zeros(2, 3, 5), None, "tokens must be [B, T, d_model] = [2, T, 4], got [2, 3, 5]"),
        (torch.zeros(2, 4), None, "tokens must be [B, T, d_model] = [2, T, 4], got [2, 4]"),
        (torch.zeros(2, 3, 4, dtype=torch.long), None, "tokens must be a floating dtype, got torch.int64"),
        (None, torch.ones(2, 3), "mask must be torch.bool (True = real token), got torch.float32"),
        (None, torch.ones(2, 4, dtype=torch.bool), "mask must be [B, T] = [2, 3] like the tokens, got [2, 4]"),
        (torch.full((2, 3, 4), float("nan")), None, "tokens contain NaN or inf"),
    ],
)
def test_encoder_contract_errors(tokens, mask, expected):
    msg = error(check_encoder_module, ENC, FakeEncoder(4, tokens, mask), 4)
    assert msg.startswith("encoder plugin 'fake_enc' (from acme-enc): ") and expected in msg


def test_check_tokens_is_what_the_model_runs_every_forward():
    t, m = check_tokens(Tokens(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)), 4, "encoder", "x", "pkg")
    assert t.shape == (2, 3, 4) and m.dtype == torch.bool
    with pytest.raises(ContractError, match=r"encoder plugin 'x' \(from pkg\): forward must return Tokens"):
        check_tokens(torch.zeros(2, 3, 4), 4, "encoder", "x", "pkg")


def test_encoder_without_example_input():
    class NoExample(nn.Module):
        def forward(self, x):
            return x

    assert "no example_input(batch_size, generator) method" in error(check_encoder_module, ENC, NoExample(), 4)


# -- routers -----------------------------------------------------------------------------


class ArgmaxRouter(nn.Module):
    """Top-1 router with knobs to break it."""

    def __init__(self, d_model, num_experts, ignore_mask=False, bad_index=False, aux_vector=False):
        super().__init__()
        self.gate = nn.Linear(d_model, num_experts)
        self.ignore_mask, self.bad_index, self.aux_vector = ignore_mask, bad_index, aux_vector

    def forward(self, x, expert_mask=None):
        logits = self.gate(x)
        if expert_mask is not None and not self.ignore_mask:
            logits = logits.masked_fill(~expert_mask, float("-inf"))
        probs = logits.softmax(-1)
        weight, expert = probs.max(-1)
        if self.bad_index:
            expert = expert + 10
        z = torch.logsumexp(logits.masked_fill(torch.isinf(logits), 0.0), -1).pow(2).mean()
        aux = {"router_z": z.expand(3) if self.aux_vector else z}
        return Routing(torch.arange(len(x)), expert, weight, aux, {})


ROUTER = RouterSpec(name="argmax", build=ArgmaxRouter, version="1", license="MIT", package="acme-routers")


def test_router_contract_passes_and_catches_breakage():
    check_router_module(ROUTER, ArgmaxRouter(4, 3), 4, 3)
    msg = error(check_router_module, ROUTER, ArgmaxRouter(4, 3, ignore_mask=True), 4, 3,
                expert_masks=[torch.tensor([True, False, False])])
    assert "routed tokens to masked expert(s) [" in msg and "expert_mask=[1, 0, 0]" in msg
    msg = error(check_router_module, ROUTER, ArgmaxRouter(4, 3, bad_index=True), 4, 3)
    assert "expert_index must be in 0..2, got 1" in msg
    msg = error(check_router_module, ROUTER, ArgmaxRouter(4, 3, aux_vector=True), 4, 3)
    assert "aux loss 'router_z' must be a scalar tensor, got [3]" in msg


def test_router_build_needs_num_experts():
    with pytest.raises(ValueError, match="needs num_experts"):
        build_checked(ROUTER, 4)
    assert isinstance(build_checked(ROUTER, 4, num_experts=3), ArgmaxRouter)


def test_kit_on_a_working_router():
    router = check_router(ROUTER, num_experts=3, d_model=8)
    assert isinstance(router, ArgmaxRouter)


# -- tasks -------------------------------------------------------------------------------


TASK = TaskSpec(name="bad_task", build=RegressionHead, version="1", license="MIT", package="acme-tasks")


def test_task_contract_errors():
    head = RegressionHead(4)
    check_task_module(TASK, head, 4)

    head.example_target = lambda b, g=None: torch.zeros(b, dtype=torch.long)
    assert "example_target dtype must be target_dtype torch.float32, got torch.int64" in error(check_task_module, TASK, head, 4)

    head = RegressionHead(4)
    head.target_shape = (2,)
    assert "example_target must be [B, *target_shape] = [3, 2], got [3]" in error(check_task_module, TASK, head, 4)

    head = RegressionHead(4)
    head.loss = lambda p, t: (p - t) ** 2  # forgot the mean
    assert "loss must be a scalar tensor, got [3]" in error(check_task_module, TASK, head, 4)

    head = RegressionHead(4)
    head.primary_metric = "r2"
    assert "primary_metric 'r2' is not among its metrics ['mae', 'rmse']" in error(check_task_module, TASK, head, 4)

    head = RegressionHead(4)
    head.metrics = lambda p, t: {"rmse": torch.tensor(1.0)}
    assert "metrics must be plain floats (use float(x)), got {'rmse': 'Tensor'}" in error(check_task_module, TASK, head, 4)


# -- the kit on broken plugins ------------------------------------------------------------


class Unused(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.lin = nn.Linear(d_model, d_model)
        self.forgotten = nn.Linear(d_model, d_model)

    def forward(self, x):
        return self.lin(x)


class Unseeded(nn.Module):
    """Draws its init from Python's RNG: two seeded builds differ."""

    def __init__(self, d_model):
        super().__init__()
        import random

        self.lin = nn.Linear(d_model, d_model)
        with torch.no_grad():
            self.lin.bias.fill_(random.random())

    def forward(self, x):
        return self.lin(x)


class HiddenState(nn.Module):
    """Keeps a tensor as a plain attribute: it does not travel in the state dict."""

    def __init__(self, d_model):
        super().__init__()
        self.lin = nn.Linear(d_model, d_model)
        self.scale = torch.rand(d_model)

    def forward(self, x):
        return self.lin(x) * self.scale


def test_kit_reports_unused_parameters():
    with pytest.raises(PluginCheckFailed, match=r"no gradient reached trainable parameter\(s\) \['forgotten.weight', 'forgotten.bias'\]"):
        check_expert(expert_spec(Unused), d_model=8)


def test_kit_reports_nondeterministic_build():
    with pytest.raises(PluginCheckFailed, match=r"two builds under torch.manual_seed\(0\) differ in \['lin.bias'\]"):
        check_expert(expert_spec(Unseeded), d_model=8)


def test_kit_reports_state_outside_the_state_dict():
    with pytest.raises(PluginCheckFailed, match="state lives outside parameters and buffers"):
        check_expert(expert_spec(HiddenState), d_model=8)


def test_kit_failure_is_both_contract_error_and_assertion():
    with pytest.raises(AssertionError) as info:
        check_expert(expert_spec(WrongWidth), d_model=8)
    assert isinstance(info.value, ContractError) and "acme-experts" in str(info.value)


def test_kit_checks_declared_params_at_reference_width():
    with pytest.raises(ContractError, match="declares params=5"):
        check_expert(expert_spec(SwiGLUExpert, params=5), d_model=8)
    check_expert(expert_spec(SwiGLUExpert, params=5), d_model=8, check_params=False)


def test_kit_accepts_names_and_options():
    module = check_encoder("tabular", d_model=8, n_numeric=1, cardinalities=[2])
    assert module.n_numeric == 1
    check_task("classification", d_model=8, num_classes=5, pooling="attention")
    with pytest.raises(KeyError, match="no expert plugin named 'nope'"):
        check_expert("nope")
    with pytest.raises(TypeError, match="expected a task spec, got a expert spec"):
        check_task(expert_spec(SwiGLUExpert))
    assert isinstance(check_encoder(ENC, d_model=4), FakeEncoder)
