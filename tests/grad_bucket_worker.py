"""Run by torchrun in test_distributed: trains a tiny ResNet through the torch engine (bucketed all-reduce overlapped
with backward) and, beside it, a copy through the per-parameter reference (backward, drop frozen grads,
``all_reduce_grads``, step) on the same batches, under a schedule that freezes a prefix group, then a middle group,
then trains everything through the ``mults=None`` fallback; writes this rank's checks to ``<out>/rank<R>.json``."""

import copy
import hashlib
import json
import os
import sys

import torch

from pst_dist.config import ModelConfig
from pst_dist.distributed import all_reduce_grads, broadcast_buffers, init_distributed, teardown
from pst_dist.engine import TorchEngine
from pst_dist.models import build_model
from pst_dist.pst.freeze import drop_frozen_grads, param_groups, set_group_lrs, trace_units
from pst_dist.pst.groups import layer_groups

ARMED, FALLBACK = True, False
# (mults, whether backward gets them): group 0 frozen (no_grad prefix), then group 2 frozen (its gradient computed
# and dropped), then everything through the fallback, then group 1 frozen (the buckets rebuilt)
SCHEDULE = [((0.0, 1, 1, 1, 1, 1), ARMED)] * 3 + [((0.5, 1, 0.0, 1, 1, 1), ARMED)] * 2 + \
           [((1, 1, 1, 1, 1, 1), FALLBACK)] * 2 + [((1, 0.0, 0.5, 1, 1, 1), ARMED)]


def build(model):
    gm = trace_units(model, layer_groups(model), torch.zeros(2, 3, 16, 16))
    return gm, torch.optim.AdamW(param_groups(model, gm.groups, 0.01, 0.05), lr=0.01)


def main(out: str) -> None:
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=0.125), 4, 3, 16)
    model.layer3.register_parameter("spare", torch.nn.Parameter(torch.zeros(3)))
    ref_model = copy.deepcopy(model)
    gm, opt = build(model)
    ref_gm, ref_opt = build(ref_model)
    # a trainable parameter that never gets a gradient: it stays None and holds back the buckets launched after it
    spare_group = next(gr.index for gr in gm.groups if "layer3.spare" in gr.param_names)
    engine = TorchEngine(model, opt, info.world_size, bucket_mb=0.01)  # ~10 KB: many buckets
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    stem = gm.groups[0].param_names
    g = torch.Generator().manual_seed(100 + info.rank)  # each rank its own batches
    checks = {"equal_every_step": [], "stem_untouched_while_frozen": [], "stem_no_optimizer_state": [],
              "launched_during_backward": [], "spare_grad_none": True, "bucket_builds": 0, "spare_group": spare_group}
    buckets_seen = None
    for mults, armed in SCHEDULE:
        x = torch.randint(0, 256, (8, 3, 16, 16), generator=g).float() / 255
        y = torch.randint(0, 4, (8,), generator=g)
        for m, gm_, o in ((model, gm, opt), (ref_model, ref_gm, ref_opt)):
            m.train()
            gm_.fix_frozen_bn(mults)
            with torch.no_grad():
                broadcast_buffers(m)
            gm_.set_frozen_prefix(mults)
            set_group_lrs(o, 0.01, mults)
        # the engine: buckets armed before backward, finished before the optimizer step
        loss = torch.nn.functional.cross_entropy(model(x), y)
        engine.backward(loss, mults if armed else None)
        if armed:
            checks["launched_during_backward"].append([engine.grad_sync.launched, len(engine.grad_sync.buckets)])
            if engine.grad_sync.buckets is not buckets_seen:
                buckets_seen, checks["bucket_builds"] = engine.grad_sync.buckets, checks["bucket_builds"] + 1
        engine.step(mults)
        # the reference: one all-reduce per parameter after backward
        ref_opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(ref_model(x), y).backward()
        drop_frozen_grads(ref_opt, mults)
        all_reduce_grads(ref_model.parameters(), info.world_size)
        ref_opt.step()

        checks["equal_every_step"].append(all(torch.equal(p, q) for p, q in
                                              zip(model.parameters(), ref_model.parameters(), strict=True)))
        checks["spare_grad_none"] &= model.layer3.spare.grad is None
        if mults[0] == 0:
            params = dict(model.named_parameters())
            checks["stem_untouched_while_frozen"].append(all(torch.equal(params[n], start[n]) for n in stem))
            checks["stem_no_optimizer_state"].append(all(params[n] not in opt.state for n in stem))
    checks["spare_untouched"] = torch.equal(model.layer3.spare, start["layer3.spare"])
    checks["checksum"] = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    with open(os.path.join(out, f"rank{info.rank}.json"), "w") as f:
        json.dump(checks, f)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1])
