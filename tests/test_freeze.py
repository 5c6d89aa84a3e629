"""PST.md invariants: frozen weights bit-identical, optimizer state and weight decay untouched, BatchNorm stats fixed,
no backward through a frozen prefix."""

import pytest
import torch

from pst_dist.config import LossConfig, ModelConfig, StageConfig
from pst_dist.data.pipeline import Normalize
from pst_dist.models import build_model
from pst_dist.pst.freeze import param_groups, trace_units
from pst_dist.pst.groups import layer_groups
from pst_dist.pst.schedule import Schedule
from pst_dist.train import train_step

NOAUTO = lambda: torch.autocast("cpu", enabled=False)


def setup(opt_name, freeze, model_name="resnet18"):
    kw = dict(width=0.125) if model_name == "resnet18" else dict(patch_size=4)
    model = build_model(ModelConfig(name=model_name, **kw), 5, 3, 16)
    gm = trace_units(model, layer_groups(model), torch.zeros(2, 3, 16, 16))
    groups = param_groups(model, gm.groups, 0.1, 0.05)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9) if opt_name == "sgd" else torch.optim.AdamW(groups, lr=0.01)
    stages = [StageConfig(steps=3), StageConfig(freeze=freeze, loss=LossConfig(view_ce=0.5, consistency=0.5))]
    sched = Schedule(stages, gm.num_groups, steps_per_epoch=3, total_steps=8)
    return model, gm, opt, sched


def run_steps(model, gm, opt, sched, steps):
    g = torch.Generator().manual_seed(0)
    norm = Normalize(torch.full((3,), 0.5), torch.full((3,), 0.25), torch.device("cpu"))
    model.train()
    for t in steps:
        st = sched.stage_at(t)
        model.train()
        gm.fix_frozen_bn(st.mults)
        x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 5, (8,), generator=g)
        train_step(gm, opt, st, x, y, 0.1, norm, 5, NOAUTO)


def snapshot(model, gm, idx):
    names = {n for i in idx for n in gm.groups[i].param_names}
    params = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    bufs = {n: b.clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[0] + ".weight" in names}
    return params, bufs


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("freeze", [[0, 1], [2], [0, 3]])
def test_frozen_groups_bit_identical_state_untouched(opt_name, freeze):
    model, gm, opt, sched = setup(opt_name, freeze)
    run_steps(model, gm, opt, sched, range(3))  # stage 0: everything trains, optimizer state exists
    params, bufs = snapshot(model, gm, freeze)
    assert bufs, "expected BatchNorm buffers in the frozen groups"
    state_before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for g in freeze
                    for p in opt.param_groups[g]["params"]}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if n not in params}
    run_steps(model, gm, opt, sched, range(3, 8))  # stage 1: frozen
    for n, p in model.named_parameters():
        if n in params:
            assert torch.equal(p, params[n]), f"frozen {n} changed"
    for n, b in model.named_buffers():
        if n in bufs:
            assert torch.equal(b, bufs[n]), f"frozen BatchNorm buffer {n} changed"
    for g in freeze:
        assert opt.param_groups[g]["lr"] == 0 and opt.param_groups[g]["weight_decay"] == 0
        for p in opt.param_groups[g]["params"]:
            after = opt.state[p]
            for k, v in state_before[id(p)].items():
                assert torch.equal(after[k], v), f"optimizer state {k} of a frozen param moved"
    changed = sum(not torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)
    assert changed > 0.5 * len(others), "trainable groups should keep learning"


@pytest.mark.parametrize("model_name", ["resnet18", "vit_tiny_patch16_224"])
def test_no_backward_through_frozen_prefix(model_name):
    model, gm, opt, sched = setup("sgd", [0, 1], model_name)
    st = sched.stage_at(5)
    gm.set_frozen_prefix(st.mults)
    x = torch.rand(4, 3, 16, 16)
    out = model(x)
    # the prefix ran under no_grad: no autograd graph reaches its parameters
    prefix = {n for i in (0, 1) for n in gm.groups[i].param_names}
    out.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    body = [n for n in prefix if not n.startswith(("pos_embed", "cls_token"))]  # ViT adds these outside units
    assert body and all(grads[n] is None for n in body)
    assert any(grads[n] is not None for n in grads if n not in prefix)
    # eval under no_grad still works and does not leave grad mode switched on
    with torch.no_grad():
        model(x)
        assert not torch.is_grad_enabled()
    gm.set_frozen_prefix(sched.stage_at(0).mults)
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in body)
