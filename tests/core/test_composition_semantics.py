"""Stack, Average, Split, Fuse and Parallel against references computed by hand from the adapters' weights.

For one bottleneck location (the FFN output of layer 1) the test captures what the location received --
h (the sublayer output before any adapter), x (the residual input) -- and what it produced, then rebuilds
the expected output from the adapter modules' weights with plain tensor algebra, following AdapterHub's
pre/post stages (DESIGN.md section 2):

    post-LN (BERT):        pre(v) = LN(v + x),  post(v) = LN(v + x)   (the same LayerNorm twice)
    pre-LN (GPT-2, Llama): pre(v) = v + x,      post(v) = v           (the block adds x afterwards)
    seq_bn a alone:        post(h + f_a(pre(h)))                     f(z) = up(relu(down(z))) * scaling
    Stack(a, b):           o = h + f_a(pre(h));  post(o + f_b(pre(o)))
    Average(a, b; w):      post(h + w_a f_a(pre(h)) + w_b f_b(pre(h)))   (w normalised; no extra 1/N)
    Split(a, b; s):        positions [0, s) as a alone, the rest as b alone
    Fuse(a, b):            post(h + sum_i softmax_i(q . k_i) v_i),  q = Q(pre(h)), k_i = K(up_i), v_i = V(up_i)

LoRA/IA3 are checked the same way at the attention value projection. Invalid setups must raise a
ValueError naming the block and the reason before any tensor is touched (no embedding forward ran).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from adapters_core import (
    AdapterFusionConfig,
    AdapterSetup,
    Average,
    BatchSplit,
    Fuse,
    Parallel,
    Split,
    Stack,
)
from adapters_core.routing import ForwardContext

from .tiny_models import (
    ARCHS,
    ATTNS,
    DECODERS,
    METHODS,
    add_adapter,
    add_noise,
    build,
    max_abs,
    one_torch_thread,
    padded_inputs,
    run,
)

TOL = 1e-5
LAYER = 1
SEQ = 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


_MODELS: dict[str, torch.nn.Module] = {}


def model_for(arch: str) -> torch.nn.Module:
    """Eager model with seq_bn a, b, c; par_bn par; LoRA l1, l2; IA3 i1, i2; prefix p; mam; Fuse(a, b)."""
    if arch not in _MODELS:
        model = build(arch, "eager")
        adapters = {"a": "seq_bn", "b": "seq_bn", "c": "seq_bn", "par": "par_bn", "l1": "lora", "l2": "lora",
                    "i1": "ia3", "i2": "ia3", "p": METHODS["prefix_tuning"], "mam": METHODS["mam"]}
        for seed, (name, config) in enumerate(adapters.items()):
            add_adapter(model, name, config, seed=200 + seed)
        model.add_adapter_fusion(Fuse("a", "b"))
        add_noise(model, [p for _, p in model.fusion_named_parameters(Fuse("a", "b"))], seed=300)
        model.eval()
        _MODELS[arch] = model
    return _MODELS[arch]


def layer_of(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    base = model.base_model
    return {"bert": lambda: base.encoder.layer, "gpt2": lambda: base.h, "llama": lambda: base.layers}[arch]()[LAYER]


# ---------------------------------------------------------------------------------------------------
# capturing one bottleneck location (the FFN output) and the hand-computed stages
# ---------------------------------------------------------------------------------------------------


@dataclass
class Location:
    """h, x and the produced output of layer LAYER's FFN-output adapter location, plus its stages."""

    arch: str
    layer: torch.nn.Module
    captured: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def post_ln(self) -> bool:
        return self.arch == "bert"

    def ln(self, v: torch.Tensor) -> torch.Tensor:
        norm = self.layer.output.LayerNorm
        return F.layer_norm(v, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def pre(self, v: torch.Tensor) -> torch.Tensor:
        x = self.captured["x"]
        return self.ln(v + x) if self.post_ln else v + x

    def post(self, v: torch.Tensor) -> torch.Tensor:
        return self.ln(v + self.captured["x"]) if self.post_ln else v

    def adapter(self, name: str) -> torch.nn.Module:
        container = self.layer.output if self.post_ln else self.layer.output_adapters
        return container.adapters[name]

    def fusion(self, name: str) -> torch.nn.Module:
        container = self.layer.output if self.post_ln else self.layer.output_adapters
        return container.adapter_fusion_layer[name]

    def up(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """f(z) by hand: up(act(down(z))) * scaling, from the adapter's Linear weights."""
        adapter = self.adapter(name)
        cfg = adapter.config
        assert not cfg.ln_before and not cfg.ln_after and not cfg.phm_layer
        down = adapter.adapter_down[0]
        act = {"relu": torch.relu, "swish": F.silu}[cfg.non_linearity.lower()]
        hidden = act(z @ down.weight.T + down.bias)
        return (hidden @ adapter.adapter_up.weight.T + adapter.adapter_up.bias) * float(cfg.scaling)

    def single(self, name: str) -> torch.Tensor:
        h = self.captured["h"]
        return self.post(h + self.up(name, self.pre(h)))


@contextmanager
def capture_location(model: torch.nn.Module, arch: str) -> Iterator[Location]:
    layer = layer_of(model, arch)
    loc = Location(arch, layer)
    handles = []

    def keep(key: str, value: object) -> None:
        assert key not in loc.captured, f"{key} captured twice in one forward"
        loc.captured[key] = (value[0] if isinstance(value, tuple) else value).detach().clone()

    if arch == "bert":
        sub = layer.output
        handles.append(sub.dropout.register_forward_hook(lambda m, a, out: keep("h", out)))
        handles.append(sub.register_forward_pre_hook(
            lambda m, a, kw: keep("x", a[1] if len(a) > 1 else kw["input_tensor"]), with_kwargs=True))
        handles.append(sub.register_forward_hook(lambda m, a, out: keep("out", out)))
    else:
        sub = layer.mlp
        norm = layer.ln_2 if arch == "gpt2" else layer.post_attention_layernorm
        handles.append(norm.register_forward_pre_hook(lambda m, a: keep("x", a[0])))
        # prepend: runs before the library's hook, so it sees the sublayer's own output
        handles.append(sub.register_forward_hook(lambda m, a, out: keep("h", out), prepend=True))
        handles.append(sub.register_forward_hook(lambda m, a, out: keep("out", out)))
    try:
        yield loc
    finally:
        for handle in handles:
            handle.remove()


def run_at_location(arch: str, setup: object) -> Location:
    model = model_for(arch)
    inputs = padded_inputs(arch, [SEQ, SEQ], seed=3)
    with capture_location(model, arch) as loc:
        run(model, inputs, setup)
    assert set(loc.captured) == {"h", "x", "out"}
    return loc


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    diff = max_abs(got, want)
    assert diff < TOL, f"{what}: the model's output differs from the hand-computed reference by {diff:.3g}"


# ---------------------------------------------------------------------------------------------------
# bottleneck compositions at one location
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_single_seq_bn_matches_hand_reference(arch: str) -> None:
    loc = run_at_location(arch, "a")
    assert_close(loc.captured["out"], loc.single("a"), f"{arch} seq_bn")
    # sanity: the adapter really moves the location's output
    assert max_abs(loc.captured["out"], loc.post(loc.captured["h"])) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_single_par_bn_matches_hand_reference(arch: str) -> None:
    """par_bn: post(h + scaling * f(x)) -- the adapter reads the residual input, not h."""
    loc = run_at_location(arch, "par")
    h, x = loc.captured["h"], loc.captured["x"]
    assert loc.adapter("par").config.scaling == 4.0
    assert_close(loc.captured["out"], loc.post(h + loc.up("par", x)), f"{arch} par_bn")


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_stack_feeds_a_output_into_b(arch: str) -> None:
    loc = run_at_location(arch, Stack("a", "b"))
    h = loc.captured["h"]
    o_a = h + loc.up("a", loc.pre(h))
    want = loc.post(o_a + loc.up("b", loc.pre(o_a)))
    assert_close(loc.captured["out"], want, f"{arch} Stack(a, b)")
    # the order matters
    o_b = h + loc.up("b", loc.pre(h))
    assert max_abs(want, loc.post(o_b + loc.up("a", loc.pre(o_b)))) > 1e-4


@pytest.mark.parametrize("weights", [None, [1, 3]])
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_average_is_normalised_weighted_sum_without_extra_divide(arch: str, weights: list[int] | None) -> None:
    setup = Average("a", "b", weights=weights)
    w = [0.5, 0.5] if weights is None else [0.25, 0.75]
    assert list(setup.weights) == w
    loc = run_at_location(arch, setup)
    h = loc.captured["h"]
    z = loc.pre(h)
    outputs = [h + loc.up("a", z), h + loc.up("b", z)]  # each child's adapter output (with its residual)
    want = loc.post(w[0] * outputs[0] + w[1] * outputs[1])
    assert_close(loc.captured["out"], want, f"{arch} {setup!r}")
    # AdapterHub 1.3 takes torch.mean over the weighted outputs, i.e. divides by N = 2 once more
    adapterhub = loc.post((w[0] * outputs[0] + w[1] * outputs[1]) / 2)
    assert max_abs(loc.captured["out"], adapterhub) > 1e-2, "Average copies AdapterHub's extra 1/N"


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_split_sends_first_positions_to_a_and_the_rest_to_b(arch: str) -> None:
    loc = run_at_location(arch, Split("a", "b", splits=[3, SEQ - 3]))
    out = loc.captured["out"]
    assert_close(out[:, :3], loc.single("a")[:, :3], f"{arch} Split: positions 0-2 through a")
    assert_close(out[:, 3:], loc.single("b")[:, 3:], f"{arch} Split: positions 3-6 through b")
    assert max_abs(loc.single("a"), loc.single("b")) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_fuse_is_attention_over_the_adapters_up_outputs(arch: str) -> None:
    cfg = AdapterFusionConfig.load("dynamic")
    assert (cfg.query, cfg.key, cfg.value, cfg.value_before_softmax) == (True, True, True, True)
    assert (cfg.query_before_ln, cfg.residual_before, cfg.temperature) == (False, False, False)
    loc = run_at_location(arch, Fuse("a", "b"))
    fusion = loc.fusion("a,b")
    assert fusion.T == 1.0
    h = loc.captured["h"]
    z = loc.pre(h)  # the last child's pre stage; query taken after the LayerNorm (query_before_ln=False)
    ups = [loc.up("a", z), loc.up("b", z)]
    q = z @ fusion.query.weight.T + fusion.query.bias
    keys = [u @ fusion.key.weight.T + fusion.key.bias for u in ups]
    values = [u @ fusion.value.weight.T for u in ups]
    scores = torch.stack([(q * k).sum(-1) for k in keys], dim=-1)  # [B, T, 2]
    probs = torch.softmax(scores, dim=-1)
    assert float(probs.min()) > 0.01, "the test needs both adapters to carry weight"
    mixed = probs[..., 0:1] * values[0] + probs[..., 1:2] * values[1]
    assert_close(loc.captured["out"], loc.post(h + mixed), f"{arch} Fuse(a, b)")


# ---------------------------------------------------------------------------------------------------
# LoRA / IA3 at the attention value projection
# ---------------------------------------------------------------------------------------------------


@dataclass
class Projection:
    """Input and output of the module holding the attention value projection (GPT-2: the fused c_attn,
    whose output is [q | k | v], 32 columns each)."""

    module: torch.nn.Module
    fused: bool
    captured: dict[str, torch.Tensor] = field(default_factory=dict)

    def base(self) -> torch.Tensor:
        x, m = self.captured["in"], self.module
        if self.fused:  # GPT-2's Conv1D: weight is [in, out]
            return x @ m.weight + m.bias
        return F.linear(x, m.weight, m.bias)

    def lora_deltas(self, name: str) -> list[tuple[slice, torch.Tensor]]:
        """(output columns, x A^T B^T * alpha / r) by hand; on c_attn (attn_matrices q, v) A = [A_q; A_v]
        and B = [B_q; B_v] (AdapterHub's grouped layout) update the q and v thirds."""
        lora, x = self.module.loras[name], self.captured["in"]
        a, b, s = lora.lora_A, lora.lora_B, lora.scaling
        if not self.fused:
            return [(slice(None), x @ a.T @ b.T * s)]
        r = a.shape[0] // 2
        assert lora.groups == 2 and b.shape[0] == 64
        return [(slice(0, 32), x @ a[:r].T @ b[:32].T * s), (slice(64, 96), x @ a[r:].T @ b[32:].T * s)]

    def ia3_vectors(self, name: str) -> list[tuple[slice, torch.Tensor]]:
        """(output columns, scaling vector); IA3's attn_matrices are k and v (c_attn: the k and v thirds)."""
        ia3 = self.module.loras[name]
        vec = ia3.lora_B[:, 0] * ia3.scaling
        if not self.fused:
            return [(slice(None), vec)]
        return [(slice(32, 64), vec[:32]), (slice(64, 96), vec[32:])]


def projection_for(model: torch.nn.Module, arch: str) -> Projection:
    layer = layer_of(model, arch)
    if arch == "bert":
        return Projection(layer.attention.self.value, False)
    if arch == "gpt2":
        return Projection(layer.attn.c_attn, True)
    return Projection(layer.self_attn.v_proj, False)


def run_at_projection(arch: str, setup: object) -> Projection:
    model = model_for(arch)
    proj = projection_for(model, arch)
    handle_in = proj.module.register_forward_pre_hook(lambda m, a: proj.captured.__setitem__("in", a[0].clone()))
    handle_out = proj.module.register_forward_hook(lambda m, a, o: proj.captured.__setitem__("out", o.clone()))
    try:
        run(model, padded_inputs(arch, [SEQ, SEQ], seed=3), setup)
    finally:
        handle_in.remove()
        handle_out.remove()
    return proj


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_lora_single_and_average(arch: str) -> None:
    proj = run_at_projection(arch, "l1")
    want = proj.base().clone()
    for cols, delta in proj.lora_deltas("l1"):
        want[..., cols] += delta
    assert_close(proj.captured["out"], want, f"{arch} LoRA l1")

    proj = run_at_projection(arch, Average("l1", "l2", weights=[1, 3]))
    want, adapterhub = proj.base().clone(), proj.base().clone()
    for (cols, d1), (_, d2) in zip(proj.lora_deltas("l1"), proj.lora_deltas("l2"), strict=True):
        want[..., cols] += 0.25 * d1 + 0.75 * d2
        adapterhub[..., cols] += (0.25 * d1 + 0.75 * d2) / 2  # AdapterHub's extra 1/N
    assert_close(proj.captured["out"], want, f"{arch} Average(l1, l2)")
    assert max_abs(proj.captured["out"], adapterhub) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_ia3_single_and_average(arch: str) -> None:
    proj = run_at_projection(arch, "i1")
    want = proj.base().clone()
    for cols, vec in proj.ia3_vectors("i1"):
        want[..., cols] *= vec
    assert_close(proj.captured["out"], want, f"{arch} IA3 i1")

    proj = run_at_projection(arch, Average("i1", "i2", weights=[3, 1]))
    want = proj.base().clone()
    for (cols, v1), (_, v2) in zip(proj.ia3_vectors("i1"), proj.ia3_vectors("i2"), strict=True):
        want[..., cols] *= 0.75 * v1 + 0.25 * v2
    assert_close(proj.captured["out"], want, f"{arch} Average(i1, i2)")


# ---------------------------------------------------------------------------------------------------
# Parallel: every child sees the whole batch
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", ARCHS)
def test_parallel_gives_each_child_the_whole_batch(arch: str, attn: str) -> None:
    model = build(arch, attn)
    for seed, (name, config) in enumerate(
        {"a": "seq_bn", "l1": "lora", "p": METHODS["prefix_tuning"], "mam": METHODS["mam"]}.items()
    ):
        add_adapter(model, name, config, seed=400 + seed)
    side = "left" if arch in DECODERS else "right"
    inputs = padded_inputs(arch, [6, 3, 5], side, seed=53)
    valid = inputs["attention_mask"].bool()
    for setup in (Parallel("a", "l1", "p"), Parallel(Stack("p", "a"), "mam", Stack("l1", "a"))):
        out = run(model, inputs, setup)
        assert out.shape[0] == 3 * len(setup.children)
        for k, child in enumerate(setup.children):
            alone = run(model, inputs, child)
            copy = out[3 * k:3 * (k + 1)]
            diff = max_abs(copy[valid], alone[valid])
            assert diff < TOL, f"{arch}/{attn}: copy {k} of {setup!r} differs from {child!r} alone by {diff:.3g}"


# ---------------------------------------------------------------------------------------------------
# invalid setups: ValueError naming the block and the reason, before any tensor is touched
# ---------------------------------------------------------------------------------------------------

INVALID = [
    pytest.param(Fuse("a", Parallel("b", "c")), ["invalid nesting", "Fuse('a', Parallel('b', 'c'))", "cannot hold"],
                 id="nesting-parallel-in-fuse"),
    pytest.param(BatchSplit(Parallel("a", "b"), "c", batch_sizes=[1, 1]),
                 ["invalid nesting", "BatchSplit cannot hold Parallel('a', 'b')"], id="nesting-parallel-in-batchsplit"),
    pytest.param(Average(Fuse("a", "b"), "c"), ["invalid nesting", "Average cannot hold Fuse('a', 'b')"],
                 id="nesting-fuse-in-average"),
    pytest.param(Stack("a", "nope"), ["Stack('a', 'nope')", "unknown adapter 'nope'"], id="unknown-adapter"),
    pytest.param(BatchSplit("a", Stack("b", "zzz"), batch_sizes=[1, 2]), ["Stack('b', 'zzz')", "unknown adapter 'zzz'"],
                 id="unknown-adapter-nested"),
    pytest.param(BatchSplit("a", "b", batch_sizes=[1, 1]), ["BatchSplit('a', 'b', batch_sizes=[1, 1])",
                 "batch_sizes sum to 2", "3 rows"], id="batch-sizes-too-few"),
    pytest.param(BatchSplit("a", None, batch_sizes=[3, 1]), ["batch_sizes sum to 4", "3 rows"], id="batch-sizes-too-many"),
    pytest.param(BatchSplit(BatchSplit("a", "b", batch_sizes=[1, 1]), "c", batch_sizes=[1, 2]),
                 ["BatchSplit('a', 'b', batch_sizes=[1, 1])", "batch_sizes sum to 2", "1 rows"],
                 id="batch-sizes-nested"),
    pytest.param(Split("a", "b", splits=[2, 2]), ["Split('a', 'b', splits=[2, 2])", "splits sum to 4", "7 positions"],
                 id="splits-not-summing"),
    pytest.param(Split("p", "a", splits=[3, 4]), ["Split('p', 'a', splits=[3, 4])", "'p'", "prefix_tuning",
                 "does not support Split"], id="split-over-prefix"),
    pytest.param(Average("p", "a"), ["Average('p', 'a'", "prefix_tuning", "does not support Average"],
                 id="average-over-prefix"),
    pytest.param(Average("mam", "a"), ["Average('mam', 'a'", "prefix_tuning", "does not support Average"],
                 id="average-over-mam"),
    pytest.param(Fuse("l1", "a"), ["Fuse('l1', 'a')", "bottleneck-only", "'l1'", "lora"], id="fuse-over-lora"),
    pytest.param(Fuse("mam", "a"), ["Fuse('mam', 'a')", "bottleneck-only", "prefix_tuning"], id="fuse-over-mam"),
    pytest.param(Split("l1", "a", splits=[3, 4]), ["Split('l1', 'a', splits=[3, 4])", "lora", "does not support Split"],
                 id="split-over-lora"),
    pytest.param(Split("a", "i1", splits=[3, 4]), ["'i1'", "does not support Split"], id="split-over-ia3"),
    pytest.param(Stack(Parallel("a", "b"), Parallel("a", "c")), ["Parallel", "at most one"], id="two-parallels"),
    # Regression (fixed in d307b96): this one used to be raised inside the forward, by the first Fuse location.
    pytest.param(Fuse("a", "c"), ["Fuse('a', 'c')", "'a,c'", "add_adapter_fusion"], id="fuse-without-fusion-layer"),
]


@pytest.mark.parametrize("setup,needles", INVALID)
@pytest.mark.parametrize("arch", ARCHS)
def test_invalid_setup_raises_before_any_tensor_is_touched(arch: str, setup: object, needles: list[str]) -> None:
    model = model_for(arch)
    inputs = padded_inputs(arch, [SEQ] * 3, seed=59)
    calls: list[str] = []
    handles = [
        model.base_model.get_input_embeddings().register_forward_pre_hook(lambda m, a: calls.append("embeddings")),
        layer_of(model, arch).register_forward_pre_hook(lambda m, a: calls.append("layer")),
    ]
    try:
        with pytest.raises(ValueError) as err:
            with torch.no_grad(), AdapterSetup(setup):
                model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    message = str(err.value)
    missing = [n for n in needles if n not in message]
    assert not calls, f"{setup!r}: the forward pass started ({calls}) before the ValueError: {message}"
    assert not missing, f"{setup!r}: the error {message!r} does not mention {missing}"
    # Nothing leaked: no forward context is left on this thread and a plain forward still works.
    assert ForwardContext.current() is None
    assert AdapterSetup.get_context() is None
    assert torch.equal(run(model, inputs, "a"), run(model, inputs, "a"))


def test_static_setup_with_bad_batch_size_raises_before_the_forward() -> None:
    """The statically active setup is validated against the batch the same way as a context setup."""
    model = build("bert", "eager")
    add_adapter(model, "a", "seq_bn", seed=1)
    add_adapter(model, "b", "seq_bn", seed=2)
    calls: list[int] = []
    model.base_model.get_input_embeddings().register_forward_pre_hook(lambda m, a: calls.append(1))
    model.set_active_adapters(BatchSplit("a", "b", batch_sizes=[2, 2]))
    with pytest.raises(ValueError, match=r"batch_sizes sum to 4 but the batch it receives has 3 rows"):
        with torch.no_grad():
            model(**padded_inputs("bert", [SEQ] * 3))
    assert not calls



@pytest.mark.parametrize("setup", [
    Stack(BatchSplit(Stack(Parallel("a", "l1")), "par", batch_sizes=[1, 1])),
    Average(Stack(Parallel("a", "b")), "par"),
], ids=repr)
def test_misplaced_parallel_is_a_value_error_before_the_forward(setup: object) -> None:
    """A Parallel below the top of the setup is refused by validation (it used to raise routing's internal
    FlattenError, or recurse without end in the tree interpreter)."""
    model = model_for("bert")
    calls: list[int] = []
    handle = model.base_model.get_input_embeddings().register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="a Parallel block replicates the whole batch"):
            run(model, padded_inputs("bert", [4, 4], "right", seed=3), setup)
    finally:
        handle.remove()
    assert not calls
