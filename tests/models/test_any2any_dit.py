"""Any2AnyDiT on the tiny config: shapes, roles, conditions, 4D RoPE slots, init, autocast, training."""

from __future__ import annotations

import pytest
import torch

from diffkt3d.flow.matching import FlowConfig, add_noise, sample_timesteps, velocity_target
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.config import get_config

torch.set_num_threads(1)

SIZE = (8, 12, 16)  # multiple of the tiny patch (4, 4, 4): token grid 2 x 3 x 4 = 24 per modality


def volumes(cfg, names, batch=2, seed=0, size=SIZE):
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.rand(batch, cfg.in_channels[m], *size, generator=gen) * 2 - 1 for m in names}


def trained_like(model: Any2AnyDiT, seed: int = 1) -> Any2AnyDiT:
    """Replace the zero-inits by random values so every path reaches the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("head.head", "time_projection", "blocks")) and (
                name.endswith("modulation") or "head.head" in name or "time_projection" in name
            ):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def cfg():
    return get_config("tiny")


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return trained_like(Any2AnyDiT(cfg)).eval()


@pytest.mark.parametrize(
    "target, conditions",
    [
        ("dose", ("ct", "ptv", "oar", "body", "beam", "angle")),
        ("dose", ("ct", "ptv")),
        ("dose", ()),
        ("oar", ("ct", "body")),
        ("ct", ("ptv", "oar", "dose")),
        ("ptv", ("ct", "beam", "angle")),
    ],
)
def test_output_is_target_shape_for_any_condition_subset(cfg, model, target, conditions):
    vols = volumes(cfg, (target, *conditions))
    with torch.no_grad():
        v = model(vols, target, torch.tensor([0.3, 0.9]))
    assert v.shape == (2, cfg.in_channels[target], *SIZE)  # only the target's channels
    assert torch.isfinite(v).all()


def test_zero_initialised_head_predicts_zero(cfg):
    torch.manual_seed(0)
    fresh = Any2AnyDiT(cfg)
    with torch.no_grad():
        v = fresh(volumes(cfg, cfg.modalities), "dose", torch.tensor([0.5, 1.0]))
    assert torch.count_nonzero(v) == 0


def test_output_depends_on_target_input_and_time(cfg, model):
    vols = volumes(cfg, ("dose", "ct", "ptv"))
    t = torch.tensor([0.4, 0.7])
    with torch.no_grad():
        base = model(vols, "dose", t)
        other_target = model(dict(vols, dose=torch.zeros_like(vols["dose"])), "dose", t)
        other_t = model(vols, "dose", torch.tensor([0.1, 0.2]))
    assert not torch.allclose(base, other_target, atol=1e-4)
    assert not torch.allclose(base, other_t, atol=1e-4)


def test_conditions_change_the_output(cfg, model):
    vols = volumes(cfg, ("dose", "ct", "ptv"))
    t = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        base = model(vols, "dose", t)
        perturbed = model(dict(vols, ct=vols["ct"].flip(-1)), "dose", t)
        without_ptv = model({"dose": vols["dose"], "ct": vols["ct"]}, "dose", t)
    assert not torch.allclose(base, perturbed, atol=1e-4)
    assert not torch.allclose(base, without_ptv, atol=1e-4)


def test_batch_items_are_independent_and_dict_order_irrelevant(cfg, model):
    vols = volumes(cfg, ("dose", "ct", "oar"))
    t = torch.tensor([0.2, 0.8])
    with torch.no_grad():
        both = model(vols, "dose", t)
        first = model({m: v[:1] for m, v in vols.items()}, "dose", t[:1])
        reordered = model({m: vols[m] for m in ("oar", "ct", "dose")}, "dose", t)
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both, reordered, atol=1e-5, rtol=1e-4)


def test_role_embedding_reaches_target_and_condition_tokens(cfg, model):
    """Swapping the target/condition role vectors changes the prediction (roles are used)."""
    vols = volumes(cfg, ("dose", "ct"))
    t = torch.tensor([0.5, 0.5])
    swapped = Any2AnyDiT(cfg).eval()
    swapped.load_state_dict(model.state_dict())
    with torch.no_grad():
        swapped.role_embedding.weight.copy_(model.role_embedding.weight.flip(0))
        assert not torch.allclose(model(vols, "dose", t), swapped(vols, "dose", t), atol=1e-4)


def test_rope_slot_axis_distinguishes_modalities(cfg, model):
    """Same weights, ct and ptv swap RoPE slots (domain rows swapped too): the output changes.

    Control: giving the swapped model the original RoPE slot positions back must reproduce the
    output, so the difference can only come from the RoPE slot phase.
    """
    order = list(cfg.modalities)
    i, j = order.index("ct"), order.index("ptv")
    order[i], order[j] = order[j], order[i]
    cfg_swapped = get_config("tiny", modalities=tuple(order))
    swapped = Any2AnyDiT(cfg_swapped).eval()
    state = dict(model.state_dict())
    rows = state["domain_embedding.weight"].clone()
    rows[[i, j]] = rows[[j, i]]
    state["domain_embedding.weight"] = rows
    swapped.load_state_dict(state)

    vols = volumes(cfg, ("dose", "ct", "ptv"))
    t = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        base = model(vols, "dose", t)
        moved = swapped(vols, "dose", t)
        assert not torch.allclose(base, moved, atol=1e-4)
        # Control: RoPE positions from the original slot map (domain rows stay swapped to match)
        swapped._positions = model._positions
        torch.testing.assert_close(swapped(vols, "dose", t), base, atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise_clear_value_errors(cfg, model):
    vols = volumes(cfg, ("dose", "ct"))
    t = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="target 'ptv' missing"):
        model(vols, "ptv", t)
    with pytest.raises(ValueError, match="expected \\(B, 7"):
        model(dict(vols, oar=vols["ct"]), "dose", t)
    with pytest.raises(ValueError, match="not a multiple"):
        model(volumes(cfg, ("dose",), size=(8, 8, 10)), "dose", t)
    with pytest.raises(ValueError, match="unknown modalities"):
        model(dict(vols, mri=vols["ct"]), "dose", t)
    with pytest.raises(ValueError, match="t: expected"):
        model(vols, "dose", torch.tensor(0.5))


def test_bf16_autocast_runs_with_fp32_islands(cfg, model):
    vols = volumes(cfg, ("dose", "ct", "oar"))
    t = torch.tensor([0.3, 0.6])
    with torch.no_grad():
        ref = model(vols, "dose", t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(vols, "dose", t)
    assert torch.isfinite(low).all()
    # bf16 matmuls: agree to a few percent of the output scale, not bit-exact
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_gradient_checkpointing_matches_plain_backward(cfg, model):
    vols = volumes(cfg, ("dose", "ct"))
    t = torch.tensor([0.3, 0.6])
    ckpt = Any2AnyDiT(get_config("tiny", gradient_checkpointing=True)).train()
    ckpt.load_state_dict(model.state_dict())
    plain = Any2AnyDiT(cfg).train()
    plain.load_state_dict(model.state_dict())
    for net in (plain, ckpt):
        net.zero_grad()
        net(vols, "dose", t).square().mean().backward()
    torch.testing.assert_close(
        ckpt.blocks[0].self_attn.q.weight.grad, plain.blocks[0].self_attn.q.weight.grad, atol=1e-6, rtol=1e-4
    )


def test_a_few_steps_reduce_the_flow_loss_on_one_case(cfg):
    """Overfit one fixed synthetic case: dose = smooth function of the ptv condition."""
    torch.manual_seed(0)
    net = Any2AnyDiT(cfg).train()
    vols = volumes(cfg, ("ct", "ptv"), batch=2, seed=3)
    x0 = torch.tanh(2 * vols["ptv"])  # (2, 1, D, H, W) target in [-1, 1]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen)
    t = sample_timesteps(2, FlowConfig(), generator=gen)
    inputs = dict(vols, dose=add_noise(x0, noise, t))
    target_v = velocity_target(x0, noise)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(net(inputs, "dose", t), target_v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
