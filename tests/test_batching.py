"""Batched member evaluation: the base and all LoRA members in one call on the shared base, chunked on request,
equal to one call per member (to float rounding of different batch sizes)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion_blend import Blend, BlendedDenoiser, blend_predictions, compiled
from diffusion_blend.adapters import ROUTED_FORWARD_ATTRIBUTE
from diffusion_blend.execution import Executor
from helpers import tiny
from helpers.calls import call_kwargs, cfg_inputs, denoise, lora_base, max_diff


def _calls(module):
    rows = []
    module.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append(len(args[0] if args else kwargs["sample"])), with_kwargs=True
    )
    return rows


@pytest.mark.parametrize(
    "mode, weights, kl_scale",
    [
        ("mix", {"ir": 0.3, "aes": 0.5}, 1.5),
        ("mix", {"ir": 0.3, "aes": 0.7}, 1.0),
        ("stochastic", {"ir": 0.4, "aes": 0.6}, 1.0),
        ("stochastic", {"ir": 0.4, "aes": 0.6}, 0.5),
    ],
)
def test_batched_lora_members_equal_separate_calls(mode, weights, kl_scale):
    base = lora_base()
    batched = denoise(BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}, batch_members=True), weights, kl_scale, mode)
    separate = denoise(BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}, batch_members=False), weights, kl_scale, mode)
    assert max_diff(batched, separate) <= 1e-5


@pytest.mark.parametrize(
    "mode, weights, kl_scale",
    [
        ("mix", {"ir": 0.3, "aes": 0.5}, 1.5),
        ("stochastic", {"ir": 0.4, "aes": 0.6}, 0.5),
    ],
)
def test_batched_mixed_lora_and_full_members_equal_separate_calls(mode, weights, kl_scale):
    base = lora_base(("ir",))
    members = {"ir": "ir", "aes": tiny.unet(3)}
    batched = denoise(BlendedDenoiser(base, members, batch_members=True), weights, kl_scale, mode)
    separate = denoise(BlendedDenoiser(base, members, batch_members=False), weights, kl_scale, mode)
    assert max_diff(batched, separate) <= 1e-5


def test_base_and_lora_members_take_one_call():
    base = lora_base()
    rows = _calls(base)
    denoise(BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}), {"ir": 0.3, "aes": 0.5}, kl_scale=1.5)
    assert rows == [3 * 4]  # base, ir and aes on the 4 CFG rows, stacked


def test_stochastic_lora_members_take_one_call_of_the_batch_size():
    base = lora_base()
    rows = _calls(base)
    denoise(BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}), {"ir": 0.5, "aes": 0.5}, mode="stochastic", seed=1)
    assert rows == [4]


def test_max_batch_size_chunks_the_stacked_call():
    base = lora_base()
    rows = _calls(base)
    chunked = denoise(BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}, max_batch_size=5), {"ir": 0.3, "aes": 0.5}, 1.5)
    assert rows == [5, 5, 2]
    whole = denoise(BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}), {"ir": 0.3, "aes": 0.5}, 1.5)
    assert max_diff(chunked, whole) <= 1e-5


def test_max_batch_size_input_caps_each_call_at_the_rows_it_was_called_with():
    base = lora_base()
    rows = _calls(base)
    chunked = denoise(
        BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}, max_batch_size="input"), {"ir": 0.3, "aes": 0.5}, 1.5
    )
    assert rows == [4, 4, 4]  # base, ir, aes: a CFG batch of 2 samples each
    whole = denoise(BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}), {"ir": 0.3, "aes": 0.5}, 1.5)
    assert max_diff(chunked, whole) <= 1e-5


@pytest.mark.parametrize("max_batch_size, member_calls", [(None, []), (8, ["c"]), ("input", ["a", "b", "c"])])
def test_max_batch_size_bounds_vmapped_full_members(max_batch_size, member_calls, monkeypatch):
    """Vmapped members hold their rows each: on a 4-row batch a cap of 8 rows vmaps two members at a time (the
    third, alone, is called on its own) and "input" none."""
    members = {name: tiny.unet(seed) for name, seed in (("a", 7), ("b", 8), ("c", 9))}
    called, call = [], Executor._call
    monkeypatch.setattr(
        Executor,
        "_call",
        lambda self, module, *rest: (
            called.extend(name for name, member in members.items() if member is module) or call(self, module, *rest)
        ),
    )
    weights = {"a": 0.2, "b": 0.3, "c": 0.4}
    capped = denoise(
        BlendedDenoiser(tiny.unet(0), members, vmap_full_members=True, max_batch_size=max_batch_size), weights, 1.5
    )
    assert called == member_calls
    separate = denoise(BlendedDenoiser(tiny.unet(0), members), weights, 1.5)
    assert max_diff(capped, separate) <= 1e-5


def test_vmapped_groups_keep_their_stacked_weights_from_step_to_step(monkeypatch):
    members = {name: tiny.unet(seed) for name, seed in (("a", 7), ("b", 8), ("c", 9), ("d", 10))}
    denoiser = BlendedDenoiser(tiny.unet(0), members, vmap_full_members=True, max_batch_size=8)  # two groups of two
    stacked = []
    monkeypatch.setattr(
        compiled,
        "stacked_state",
        lambda modules, real=compiled.stacked_state: stacked.append(len(modules)) or real(modules),
    )
    for _ in range(3):
        denoise(denoiser, {"a": 0.2, "b": 0.3, "c": 0.1, "d": 0.4}, 1.5)
    assert stacked == [2, 2]


def test_full_members_are_vmapped_whether_or_not_lora_rows_are_batched(monkeypatch):
    members = {"a": tiny.unet(7), "b": tiny.unet(8)}
    denoiser = BlendedDenoiser(tiny.unet(0), members, vmap_full_members=True, batch_members=False)
    stacked = []
    monkeypatch.setattr(
        compiled,
        "stacked_state",
        lambda modules, real=compiled.stacked_state: stacked.append(len(modules)) or real(modules),
    )
    denoise(denoiser, {"a": 0.4, "b": 0.6})
    assert stacked == [2]


def test_vmapped_members_follow_settings_changed_after_a_blend():
    """The weightless copy that vmap calls carries the first member's settings (FreeU): changed, it is made again."""
    base, members = tiny.unet(0), {"a": tiny.unet(7), "b": tiny.unet(8)}
    vmapped = BlendedDenoiser(base, members, vmap_full_members=True)
    denoise(vmapped, {"a": 0.4, "b": 0.6})
    for module in (base, *members.values()):
        module.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    separate = denoise(BlendedDenoiser(base, members), {"a": 0.4, "b": 0.6})
    assert max_diff(denoise(vmapped, {"a": 0.4, "b": 0.6}), separate) <= 1e-5


def test_bad_max_batch_size_raises():
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer, .input. or None"):
        BlendedDenoiser(tiny.unet(0), {"ir": tiny.unet(1)}, max_batch_size=0)


@pytest.mark.parametrize("mode, weights", [("mix", {"ir": 0.3, "aes": 0.7}), ("stochastic", {"ir": 0.5, "aes": 0.5})])
def test_pipeline_images_batched_equal_sequential(sd_loras, mode, weights):
    kwargs = dict(weights=weights, kl_scale=1.3 if mode == "mix" else 1.0, mode=mode, num_images_per_prompt=2)
    batched = Blend(tiny.sd_pipeline(), sd_loras, batch_members=True).blend(**kwargs, **call_kwargs())
    separate = Blend(tiny.sd_pipeline(), sd_loras, batch_members=False).blend(**kwargs, **call_kwargs())
    assert max_diff(batched.images, separate.images) <= 1e-5


def test_bfloat16_stays_bfloat16():
    base = lora_base().to(torch.bfloat16)
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})
    denoiser.set_blend({"ir": 0.3, "aes": 0.5}, kl_scale=1.5)
    sample, t, context = cfg_inputs()
    with torch.no_grad():
        out = denoiser(sample.bfloat16(), t, encoder_hidden_states=context.bfloat16()).sample
    assert out.dtype == torch.bfloat16


def _conv_and_linear_lora_base():
    """Adapters of different ranks on attention projections and on the ResNet convolutions."""
    base = tiny.unet(0)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"]
    for seed, (name, rank) in enumerate((("ir", 2), ("aes", 3)), start=10):
        tiny.add_lora(base, name, seed, tiny.lora_config(rank=rank, targets=targets))
    base.set_adapter([])
    return base


@pytest.mark.parametrize(
    "mode, weights, kl_scale",
    [
        ("mix", {"ir": 0.3, "aes": 0.5}, 1.5),
        ("stochastic", {"ir": 0.4, "aes": 0.6}, 0.5),
    ],
)
def test_stacked_conv_and_linear_updates_equal_separate_calls(mode, weights, kl_scale):
    base = _conv_and_linear_lora_base()
    batched = denoise(
        BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}, batch_members=True), weights, kl_scale, mode, seed=2
    )
    separate = denoise(
        BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}, batch_members=False), weights, kl_scale, mode, seed=2
    )
    assert max_diff(batched, separate) <= 1e-5


def test_routed_member_equals_plain_peft_with_conv_targets():
    base = _conv_and_linear_lora_base()
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})
    routed = denoise(denoiser, {"aes": 1.0})
    base.set_adapter("aes")
    sample, t, context = cfg_inputs()
    with torch.no_grad():
        plain = base(sample, t, encoder_hidden_states=context).sample
    assert torch.equal(routed, plain)


def test_gradients_flow_through_a_stacked_blend():
    base = lora_base()
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})
    denoiser.set_blend({"ir": 0.3, "aes": 0.5}, kl_scale=1.5)
    sample, t, context = cfg_inputs()
    sample.requires_grad_(True)
    out = denoiser(sample, t, encoder_hidden_states=context).sample
    out.square().mean().backward()
    assert sample.grad is not None and torch.isfinite(sample.grad).all()
    with torch.no_grad():
        assert max_diff(out.detach(), denoiser(sample, t, encoder_hidden_states=context).sample) <= 1e-6


def test_dora_members_are_refused():
    from peft import LoraConfig

    base = tiny.unet(0)
    base.add_adapter(LoraConfig(r=2, target_modules=tiny.LORA_TARGETS, use_dora=True), "ir")
    with pytest.raises(ValueError, match="LoRA variant .*DoRA"):
        BlendedDenoiser(base, {"ir": "ir"})


def test_lora_weight_gradients_through_stacked_and_separate_calls_agree():
    grads = []
    for batch_members in (True, False):
        base = lora_base()
        base.requires_grad_(False)
        for key, parameter in base.named_parameters():
            parameter.requires_grad_("lora_" in key)
        denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}, batch_members=batch_members)
        denoiser.set_blend({"ir": 0.3, "aes": 0.5}, kl_scale=1.5)
        sample, t, context = cfg_inputs()
        denoiser(sample, t, encoder_hidden_states=context).sample.square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in base.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


@pytest.mark.parametrize("return_dict", [True, False])
def test_vmapped_full_members_equal_separate_calls(return_dict):
    members = {"ir": tiny.unet(1), "aes": tiny.unet(2)}
    outputs = []
    for vmap in (True, False):
        denoiser = BlendedDenoiser(tiny.unet(0), members, vmap_full_members=vmap)
        denoiser.set_blend({"ir": 0.3, "aes": 0.5}, kl_scale=1.5)
        sample, t, context = cfg_inputs()
        with torch.no_grad():
            outputs.append(denoiser(sample, t, encoder_hidden_states=context, return_dict=return_dict))
    assert type(outputs[0]) is type(outputs[1])
    assert max_diff(outputs[0][0], outputs[1][0]) <= 1e-5


def test_vmapped_members_may_differ_in_requires_grad():
    """A member the user made (trainable by default) beside one a Blend loaded from a folder (frozen)."""
    members = {"ir": tiny.unet(1), "aes": tiny.unet(2).requires_grad_(False)}
    denoiser = BlendedDenoiser(tiny.unet(0), members, vmap_full_members=True)
    denoiser.set_blend({"ir": 0.3, "aes": 0.5}, kl_scale=1.5)
    sample, t, context = cfg_inputs()
    with torch.no_grad():
        blended = denoiser(sample, t, encoder_hidden_states=context).sample
        outputs = [
            module(sample, t, encoder_hidden_states=context).sample
            for module in (denoiser.base, members["ir"], members["aes"])
        ]
    assert max_diff(blended, blend_predictions(outputs[0], outputs[1:], [0.3, 0.5], 1.5)) <= 1e-5


def test_vmapped_members_follow_weight_changes():
    member = tiny.unet(1)
    denoiser = BlendedDenoiser(tiny.unet(0), {"ir": member, "aes": tiny.unet(2)}, vmap_full_members=True)
    denoiser.set_blend({"ir": 0.5, "aes": 0.5})
    sample, t, context = cfg_inputs()
    with torch.no_grad():
        before = denoiser(sample, t, encoder_hidden_states=context).sample
        member.conv_in.weight.mul_(2.0)
        after = denoiser(sample, t, encoder_hidden_states=context).sample
        direct = (
            0.5 * member(sample, t, encoder_hidden_states=context).sample
            + 0.5 * denoiser.modules_by_name["aes"](sample, t, encoder_hidden_states=context).sample
        )
    assert max_diff(before, after) > 1e-3 and max_diff(after, direct) <= 1e-5


BLENDS = [
    ({"ir": 0.3, "aes": 0.5}, 1.5, "mix"),
    ({"ir": 1.0}, 1.0, "mix"),
    ({"ir": 0.4, "aes": 0.6}, 0.5, "stochastic"),
]


def test_changing_blends_inside_one_routing_context_equals_fresh_contexts():
    """A routing context (one pipeline call) keeps each layer's share of every routing it met: going back and forth
    between blends inside one must give what each blend gives on its own."""
    base = lora_base()
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})
    with denoiser.routing():
        inside = [denoise(denoiser, *blend) for blend in BLENDS + BLENDS[::-1]]
    alone = [denoise(BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}), *blend) for blend in BLENDS + BLENDS[::-1]]
    assert all(torch.equal(a, b) for a, b in zip(inside, alone))


def test_lora_members_follow_weight_changes_between_calls():
    base = lora_base()
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})
    before = denoise(denoiser, {"ir": 0.3, "aes": 0.5}, 1.5)
    with torch.no_grad():
        for layer in denoiser.router.layers:
            layer.lora_B["aes"].weight.mul_(3.0)
    after = denoise(denoiser, {"ir": 0.3, "aes": 0.5}, 1.5)
    separate = denoise(
        BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}, batch_members=False), {"ir": 0.3, "aes": 0.5}, 1.5
    )
    assert max_diff(before, after) > 1e-3 and max_diff(after, separate) <= 1e-5


def test_lora_weights_trained_inside_a_routing_context_are_read_anew():
    """Weights are read once per routing context, unless gradients reach them there: a training step inside one
    (forward with gradients, optimiser step) is seen by the next evaluation without gradients."""
    base = lora_base()
    lora_weights = [p for key, p in base.named_parameters() if "lora_" in key]
    base.requires_grad_(False)
    for parameter in lora_weights:
        parameter.requires_grad_(True)
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})
    optimiser = torch.optim.SGD(lora_weights, lr=10.0)
    sample, t, context = cfg_inputs()
    with denoiser.routing():
        before = denoise(denoiser, {"ir": 0.3, "aes": 0.5}, 1.5)
        denoiser(sample, t, encoder_hidden_states=context).sample.square().mean().backward()
        optimiser.step()
        after = denoise(denoiser, {"ir": 0.3, "aes": 0.5}, 1.5)
    separate = denoise(
        BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}, batch_members=False), {"ir": 0.3, "aes": 0.5}, 1.5
    )
    assert max_diff(before, after) > 1e-4 and max_diff(after, separate) <= 1e-5


def test_a_lora_layers_own_forward_still_runs_while_routed_and_is_given_back():
    """Libraries wrap a module's forward (accelerate's hooks): routing keeps the wrapper in the call, exactly."""
    base = lora_base()
    layer = next(layer for layer in BlendedDenoiser(base, {"ir": "ir"}).router.layers)
    calls = []

    def wrapped(*args, _inner=layer.forward, **kwargs):
        calls.append(1)
        return _inner(*args, **kwargs)

    layer.forward = wrapped
    keys = sorted(layer.__dict__) + [ROUTED_FORWARD_ATTRIBUTE]  # made once per layer, kept for compiled graphs
    batched = denoise(BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}), {"ir": 0.3, "aes": 0.5}, 1.5)
    assert len(calls) == 1  # one stacked call
    separate = denoise(
        BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}, batch_members=False), {"ir": 0.3, "aes": 0.5}, 1.5
    )
    assert max_diff(batched, separate) <= 1e-5
    assert layer.forward is wrapped and sorted(layer.__dict__) == sorted(keys)


def test_blends_on_one_base_can_be_routed_nested():
    """Two blends of one pipeline in a loop of one's own: each routing context inside the other."""
    base = lora_base()
    first, second = (BlendedDenoiser(base, {"ir": "ir", "aes": "aes"}) for _ in range(2))
    alone = [denoise(first, {"ir": 0.3, "aes": 0.5}, 1.5), denoise(second, {"ir": 0.6, "aes": 0.4}, 1.0)]
    with first.routing(), second.routing():
        nested = [denoise(first, {"ir": 0.3, "aes": 0.5}, 1.5), denoise(second, {"ir": 0.6, "aes": 0.4}, 1.0)]
        with first.routing():  # re-entered: still one routing context
            nested.append(denoise(first, {"ir": 0.3, "aes": 0.5}, 1.5))
    assert all(torch.equal(a, b) for a, b in zip(nested, alone + alone[:1]))
    assert all("forward" not in layer.__dict__ for layer in first.router.layers)


def test_lora_dropout_follows_train_and_eval_mode_inside_one_routing_context():
    """The stacked product holds only without active dropout: a training-mode call after an evaluation in the same
    routing context still applies each adapter's dropout, as in a fresh context."""
    base = lora_base(dropout=0.5)
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})

    def training_call():
        base.train()
        torch.manual_seed(7)
        try:
            return denoise(denoiser, {"ir": 0.3, "aes": 0.5}, 1.5)
        finally:
            base.eval()

    fresh = training_call()
    with denoiser.routing():
        evaluated = denoise(denoiser, {"ir": 0.3, "aes": 0.5}, 1.5)
        after_evaluation = training_call()
    assert max_diff(fresh, evaluated) > 1e-3 and torch.equal(after_evaluation, fresh)


def test_a_copy_of_the_base_made_while_routed_behaves_as_the_base():
    import copy

    base = lora_base()
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})
    with denoiser.routing():
        copied = copy.deepcopy(base)
    sample, t, context = cfg_inputs()
    outputs = []
    for module in (base, copied):
        module.set_adapter(["ir"])
        with torch.no_grad():
            outputs.append(module(sample, t, encoder_hidden_states=context).sample)
    assert torch.equal(*outputs)


# The operations whose result a host must wait for when tensors live on a GPU (item(), nonzero, unique, ...).
HOST_READS = {
    "_local_scalar_dense",
    "nonzero",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "masked_select",
    "is_nonzero",
    "equal",
    "repeat_interleave",
    "_assert_async",
}


class HostReads(TorchDispatchMode):
    """Records every host-reading operation run inside the block (on any device: on a CPU it costs nothing, on a
    GPU each one makes the host wait for the GPU to finish all queued work): the operations above, indexing with a
    boolean mask (a hidden nonzero) and ``Tensor.tolist`` (which reads memory without dispatching)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self._tolist = torch.Tensor.tolist

    def __enter__(self):
        original, ops = self._tolist, self.ops

        def recorded_tolist(tensor):
            ops.append("tolist")
            return original(tensor)

        torch.Tensor.tolist = recorded_tolist
        return super().__enter__()

    def __exit__(self, *exc_info):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc_info)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS or (name.startswith("index") and _has_boolean_index(args)):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _has_boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def test_host_reads_are_recorded():
    x = torch.randn(6)
    with HostReads() as reads:
        float(x.sum())
        x.tolist()
        x[x > 0]
        x.nonzero()
    assert reads.ops == ["_local_scalar_dense", "tolist", "index", "nonzero"]


@pytest.mark.parametrize("mode, kl_scale", [("mix", 1.5), ("mix", 1.0), ("stochastic", 1.0), ("stochastic", 0.5)])
def test_a_blended_step_makes_no_host_read_beyond_the_denoisers_own(mode, kl_scale):
    """Nothing the blend adds (planning, routing, stochastic draws) waits for a GPU: a blended step reads back to
    the host exactly what one plain call of the denoiser reads."""
    base = lora_base()
    sample, _, context = cfg_inputs()
    with torch.no_grad(), HostReads() as plain:
        base(sample, torch.tensor(400), encoder_hidden_states=context)
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})
    denoiser.set_blend(
        {"ir": 0.4, "aes": 0.6}, kl_scale=kl_scale, mode=mode, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad(), denoiser.routing():
        denoiser(sample, torch.tensor(500), encoder_hidden_states=context)
        with HostReads() as blended:
            denoiser(sample, torch.tensor(400), encoder_hidden_states=context)  # a new step
            denoiser(sample.clone(), torch.tensor(400), encoder_hidden_states=context)  # the same step again
    assert blended.ops == plain.ops * 2


@pytest.mark.parametrize("hooked_member", ["ir", "aes"])
def test_vmapped_members_with_hooks_are_refused(hooked_member):
    """A hook on a member would run for no member (the vmapped copy is made from the first) or for all of them."""
    members = {"ir": tiny.unet(1), "aes": tiny.unet(2)}
    members[hooked_member].conv_out.register_forward_hook(lambda _module, _args, output: output * 2)
    denoiser = BlendedDenoiser(tiny.unet(0), members, vmap_full_members=True)
    with pytest.raises(
        ValueError, match=f"member '{hooked_member}' carries hooks \\(on 'conv_out'\\).*vmap_full_members=False"
    ):
        denoise(denoiser, {"ir": 0.3, "aes": 0.7})
    separate = denoise(BlendedDenoiser(tiny.unet(0), members), {"ir": 0.3, "aes": 0.7})  # calls run the hook
    members[hooked_member].conv_out._forward_hooks.clear()
    assert max_diff(separate, denoise(BlendedDenoiser(tiny.unet(0), members), {"ir": 0.3, "aes": 0.7})) > 1e-3
