"""use_lightning_attention on transformers' MiniMax: logits, gradients and generate() equal transformers' own layer;
checkpoints, meta-device construction, output recording, torch.export and torch.compile work as for the stock model.

A tiny random MiniMaxConfig (no download) mixes linear- and full-attention layers and has a few experts. Accuracy is
judged as everywhere in the project: against a float64 copy of the transformers model, ours must be as accurate as
transformers' own implementation in the same dtype (err(ours) <= 2 x err(transformers) + 1e-6). In float32 both
errors are ~2e-7, far inside the issue's 1e-4 relative bound; a wrong decay or a lost state is O(1e-2).
"""

import copy
import tempfile

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_attention.integrations.transformers import (  # noqa: E402
    MiniMaxLightningAttentionAdapter,
    use_lightning_attention,
)
from lightning_attention.testing import assert_matches_baseline  # noqa: E402

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]


def tiny_config(**overrides):
    options = dict(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=3, num_experts_per_tok=2, block_size=16,
        max_position_embeddings=256, layer_types=LAYER_TYPES,
        # sdpa, not eager: in float64 eager softmax turns fully masked (left-pad) query rows into NaN, which
        # transformers' linear layers then leak into the real tokens' state (NaN * 0 = NaN).
        attn_implementation="sdpa",
        experts_implementation="eager",  # the grouped-mm experts have no float64 kernel
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    options.update(overrides)
    return transformers.MiniMaxConfig(**{key: value for key, value in options.items() if value is not None})


class AdaptedInConstruction(transformers.MiniMaxForCausalLM):
    """The adapter applied inside construction, as a subclass or a framework building the model would: under
    from_pretrained this runs on the meta device, before the checkpoint is loaded."""

    def post_init(self):
        super().post_init()
        use_lightning_attention(self, backend="torch")


@pytest.fixture(scope="module")
def models():
    """(transformers fp32, ours fp32, transformers fp64): same weights."""
    config = tiny_config()
    torch.manual_seed(0)
    theirs = transformers.MiniMaxForCausalLM(config).eval()
    # Non-trivial norm weights: a norm over the wrong axis or a dropped weight must show.
    with torch.no_grad():
        for layer in theirs.model.layers:
            if LAYER_TYPES[layer.layer_idx] == "linear_attention":
                layer.self_attn.norm.weight.uniform_(0.5, 1.5)
    ours = use_lightning_attention(copy.deepcopy(theirs))
    return theirs, ours, copy.deepcopy(theirs).double()


def batch(left_pad: bool):
    ids = torch.randint(3, 128, (3, 41), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if left_pad:
        mask[1, :9], mask[2, :30] = 0, 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def test_every_linear_layer_is_replaced_and_weights_are_shared(models):
    theirs, ours, _ = models
    for layer, kind in zip(ours.model.layers, LAYER_TYPES):
        assert isinstance(layer.self_attn, MiniMaxLightningAttentionAdapter) == (kind == "linear_attention")
    assert sorted(n for n, _ in ours.named_parameters()) == sorted(n for n, _ in theirs.named_parameters())
    model = copy.deepcopy(theirs)
    before = dict(model.named_parameters())
    use_lightning_attention(model)
    assert all(p is before[name] for name, p in model.named_parameters()), "parameters must be adopted, not copied"
    assert use_lightning_attention(model) is model, "a second call is a no-op"


@pytest.mark.parametrize("left_pad", [pytest.param(False, id="prompt"), pytest.param(True, id="left-padded-batch")])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_logits_match_transformers(models, left_pad, dtype):
    theirs, ours, exact = models
    ids, mask = batch(left_pad)
    with torch.no_grad():
        ref = exact(ids, attention_mask=mask).logits
        baseline = copy.deepcopy(theirs).to(dtype)(ids, attention_mask=mask).logits
        logits = copy.deepcopy(ours).to(dtype)(ids, attention_mask=mask).logits
    keep = mask.bool()  # padded positions' logits are meaningless in both
    assert_matches_baseline(logits[keep], ref[keep], baseline[keep], f"logits {dtype}")


def test_gradients_match_transformers(models):
    theirs, ours, exact = models
    ids, mask = batch(left_pad=True)
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for name, model in (("theirs", theirs), ("ours", ours), ("exact", exact)):
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
    assert grads["ours"].keys() == grads["theirs"].keys()
    assert any(".self_attn.qkv_proj." in n for n in grads["ours"])
    for n in grads["ours"]:
        assert_matches_baseline(grads["ours"][n], grads["exact"][n], grads["theirs"][n], f"grad {n}")


@pytest.mark.parametrize("num_beams", [pytest.param(1, id="greedy"), pytest.param(2, id="beam2")])
def test_generate_matches_transformers(models, num_beams):
    theirs, ours, exact = models
    ids, mask = batch(left_pad=True)
    new_tokens = 32 if num_beams == 1 else 8  # beam search only checks that the cache reorders correctly
    options = dict(
        attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        num_beams=num_beams, return_dict_in_generate=True, output_logits=True,
    )
    runs = (("theirs", theirs), ("ours", ours), ("exact", exact))[: 3 if num_beams == 1 else 2]
    outs = {name: m.generate(ids, **options) for name, m in runs}
    assert outs["ours"].sequences.shape == (3, 41 + new_tokens)
    assert torch.equal(outs["ours"].sequences, outs["theirs"].sequences)
    if num_beams == 1:
        assert torch.equal(outs["exact"].sequences, outs["theirs"].sequences)
        step = {name: torch.stack(out.logits, 1) for name, out in outs.items()}
        assert_matches_baseline(step["ours"], step["exact"], step["theirs"], "generate() step logits")


def test_model_without_lightning_layers_raises():
    with pytest.raises(ValueError, match="MiniMaxLightningAttention"):
        use_lightning_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_unsupported_activation_raises(models):
    from types import SimpleNamespace

    module = models[0].model.layers[0].self_attn
    with pytest.raises(ValueError, match="hidden_act"):
        MiniMaxLightningAttentionAdapter.from_minimax(module, SimpleNamespace(hidden_act="tanh", hidden_size=64))


# ---------------------------------------------------------------------------------------------------------------
# What transformers sees: its own layer (class, state_dict, init, hooks, output recording), on any device.

DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


def assert_same_state(actual: dict, expected: dict) -> None:
    """Same keys, and every value bit-identical (dtype included)."""
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


def test_adapter_is_transformers_layer_with_lightning_methods():
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    from lightning_attention.nn import LightningAttention

    assert issubclass(MiniMaxLightningAttentionAdapter, MiniMaxLightningAttention)
    assert issubclass(MiniMaxLightningAttentionAdapter, LightningAttention)
    # transformers' class comes first in the bases: none of its methods may shadow LightningAttention's.
    for name, value in vars(LightningAttention).items():
        if callable(value) and not name.startswith("__") and name not in vars(MiniMaxLightningAttentionAdapter):
            assert getattr(MiniMaxLightningAttentionAdapter, name) is value, name


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_state_dict_is_the_stock_models(models, dtype):
    """Every key of the stock model, decay buffers included, with the same values and dtypes (also after a cast:
    the buffers follow the model's dtype as transformers' do, while the decay computed with stays float32)."""
    theirs, ours, _ = models
    theirs, ours = copy.deepcopy(theirs).to(dtype), copy.deepcopy(ours).to(dtype)
    assert_same_state(ours.state_dict(), theirs.state_dict())
    assert any(key.endswith("self_attn.diagonal_decay") for key in ours.state_dict())
    assert ours.model.layers[0].self_attn.g_gamma().dtype == torch.float32


def test_checkpoints_round_trip_both_ways(models):
    """stock -> adapted -> save_pretrained -> stock from_pretrained, and stock -> save_pretrained -> a model adapted
    inside construction: no missing, unexpected or mismatched key, bit-identical state, equal logits."""
    theirs, ours, _ = models
    ids, mask = batch(left_pad=True)
    clean = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    with tempfile.TemporaryDirectory() as adapted_dir, tempfile.TemporaryDirectory() as stock_dir:
        ours.save_pretrained(adapted_dir)
        theirs.save_pretrained(stock_dir)
        stock_from_adapted, info = transformers.MiniMaxForCausalLM.from_pretrained(
            adapted_dir, output_loading_info=True
        )
        assert info == clean
        assert_same_state(stock_from_adapted.state_dict(), theirs.state_dict())
        adapted_from_stock, info = AdaptedInConstruction.from_pretrained(stock_dir, output_loading_info=True)
        assert info == clean
        assert isinstance(adapted_from_stock.model.layers[0].self_attn, MiniMaxLightningAttentionAdapter)
        assert_same_state(adapted_from_stock.state_dict(), theirs.state_dict())
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask).logits
        assert torch.equal(adapted_from_stock.eval()(ids, attention_mask=mask).logits, expected)


def test_meta_device_construction_then_init_weights():
    """Built on the meta device with the adapter applied inside construction, then to_empty() and transformers'
    init_weights() (FSDP2-style materialisation): every buffer is the directly built model's bit for bit
    (transformers' decay numbers), and with the direct model's parameters the logits are the direct model's."""
    config = tiny_config()
    with torch.device("meta"):
        meta = AdaptedInConstruction(copy.deepcopy(config))
    assert meta.model.layers[0].self_attn.slope_rate.device.type == "meta"
    meta.to_empty(device="cpu")
    meta.init_weights()
    direct = use_lightning_attention(transformers.MiniMaxForCausalLM(copy.deepcopy(config)), backend="torch")
    assert_same_state(dict(meta.named_buffers()), dict(direct.named_buffers()))
    num_decay_buffers = sum(name.endswith(DECAY_BUFFERS) for name, _ in meta.named_buffers())
    assert num_decay_buffers == len(DECAY_BUFFERS) * LAYER_TYPES.count("linear_attention")
    meta.load_state_dict(dict(direct.named_parameters()), strict=False)
    ids, mask = batch(left_pad=True)
    with torch.no_grad():
        assert torch.equal(meta.eval()(ids, attention_mask=mask).logits, direct.eval()(ids, attention_mask=mask).logits)


def test_from_pretrained_without_checkpoint_buffers():
    """from_pretrained with every key missing (all weights initialised by transformers after meta construction):
    no tensor left on meta, and the decay buffers equal the stock layer's."""
    config = tiny_config()
    model = AdaptedInConstruction.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    assert not [name for name, t in model.state_dict().items() if t.device.type == "meta"]
    stock = transformers.MiniMaxForCausalLM(copy.deepcopy(config))
    for layer, stock_layer in zip(model.model.layers, stock.model.layers):
        if isinstance(layer.self_attn, MiniMaxLightningAttentionAdapter):
            for name in DECAY_BUFFERS:
                assert torch.equal(getattr(layer.self_attn, name), getattr(stock_layer.self_attn, name)), name


def test_adapter_reset_parameters_after_to_empty(models):
    """An adapter materialised by hand (to_empty, then reset_parameters) recomputes the checkpoint buffers."""
    stock_layer = models[0].model.layers[0].self_attn
    with torch.device("meta"):
        layer = MiniMaxLightningAttentionAdapter(64, 4, 16, 0, 4, block_size=16, backend="torch")
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    for name in DECAY_BUFFERS:
        assert torch.equal(getattr(layer, name), getattr(stock_layer, name)), name
    assert torch.equal(layer.norm.weight, torch.ones(64))


def test_output_attentions_records_every_layer_as_transformers(models):
    """output_attentions records the adapted layers where it records transformers' (for linear attention: the
    layer's final state [B, H, D, D], float32 in ours), also when the recording hooks were installed before the
    swap; same count, shapes and values (to float32 accuracy) as the stock model."""
    theirs, _, _ = models
    theirs = copy.deepcopy(theirs)
    theirs.set_attn_implementation("eager")
    ids, _ = batch(left_pad=False)
    hooked_before = copy.deepcopy(theirs)
    with torch.no_grad():
        hooked_before(ids, output_attentions=True)  # installs transformers' recording hooks on the stock layers
        expected = theirs(ids, output_attentions=True).attentions
        for model in (use_lightning_attention(copy.deepcopy(theirs)), use_lightning_attention(hooked_before)):
            got = model(ids, output_attentions=True).attentions
            assert len(got) == len(expected) == len(LAYER_TYPES)
            for kind, a, e in zip(LAYER_TYPES, got, expected):
                assert a.shape == e.shape
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
                if kind == "linear_attention":
                    assert a.dtype == torch.float32


@pytest.fixture(scope="module")
def traceable():
    """An adapted model with transformers' default (traceable) experts: the eager experts loop is data-dependent."""
    torch.manual_seed(0)
    return use_lightning_attention(transformers.MiniMaxForCausalLM(tiny_config(experts_implementation=None)).eval())


@pytest.mark.parametrize("left_pad", [pytest.param(False, id="no-padding"), pytest.param(True, id="padded")])
def test_torch_export_with_and_without_attention_mask(traceable, left_pad):
    """torch.export of the adapted model (no data-dependent branch on the mask); the exported program gives the
    eager logits, also for a mask it was not traced with (right padding and a hole)."""
    ours = traceable
    ids, mask = batch(left_pad=left_pad)
    kwargs = {"attention_mask": mask, "use_cache": False} if left_pad else {"use_cache": False}
    program = torch.export.export(ours, (ids,), kwargs)
    with torch.no_grad():
        assert torch.equal(program.module()(ids, **kwargs).logits, ours(ids, **kwargs).logits)
        if left_pad:
            other = torch.ones_like(mask)
            other[0, 30:], other[2, 10:14] = 0, 0
            assert torch.equal(
                program.module()(ids, attention_mask=other, use_cache=False).logits,
                ours(ids, attention_mask=other, use_cache=False).logits,
            )


def test_torch_compile_fullgraph_forward(traceable, real_torch_empty):
    """torch.compile(model, fullgraph=True) of a whole padded MiniMax forward: one graph, reused for another mask,
    the eager logits bit for bit (aot_eager runs the same kernels; the backward of the compiled layer is
    tests/nn/test_layer_compile.py's)."""
    from tests.test_compile import compile_counted

    ids, mask = batch(left_pad=True)
    other = torch.ones_like(mask)
    other[0, 30:], other[2, 10:14] = 0, 0
    torch._dynamo.reset()
    try:
        compiled, counter = compile_counted(traceable)
        with torch.no_grad():
            for m in (mask, other):
                expected = traceable(ids, attention_mask=m, use_cache=False).logits
                assert torch.equal(compiled(ids, attention_mask=m, use_cache=False).logits, expected)
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()
