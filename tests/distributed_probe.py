"""Run train.py or eval.py (under torchrun or alone) and report, per rank, what the tests check.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_probe.py REPORT train ARGS...

Writes REPORT.<rank> (JSON):
- backward: before and after every backward, how many base tensors of sharded blocks are
  registered gathered (not DTensor shards), and which base tensors (gathered or sharded)
  require or hold a gradient;
- calls: every Llama.hidden_states call as [grad enabled, batch rows];
- load: for a sharded model, the share of each block tensor's rows this rank holds and the largest
  difference between the gathered weights and the checkpoint read by Llama.from_pretrained.
"""
import gc
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import model as model_module  # noqa: E402
from machinery import distributed  # noqa: E402

torch.set_num_threads(1)
report = {"backward": [], "calls": [], "load": None}
models = []


def base_params(block):
    return [(n, p) for n, p in block.named_parameters() if "lofit_" not in n]


def inspect_grads(when: str):
    m = models[-1]
    gathered, with_grad = 0, set()
    for i, block in enumerate(m.layers):
        sharded = hasattr(block, "_get_fsdp_state")
        for n, p in base_params(block):
            gathered += sharded and not isinstance(p, DTensor)
            if p.requires_grad or p.grad is not None:
                with_grad.add(f"layers.{i}.{n}")
        group = block._get_fsdp_state()._fsdp_param_group if sharded else None
        for fsdp_param in group.fsdp_params if group else []:
            p = fsdp_param.sharded_param
            if p.requires_grad or p.grad is not None:
                with_grad.add(f"layers.{i}.{fsdp_param._param_fqn} (shard)")
    for n, p in m.named_parameters():
        if "lofit_" not in n and (p.requires_grad or p.grad is not None):
            with_grad.add(n)
    report["backward"].append({"when": when, "gathered": gathered, "with_grad": sorted(with_grad)})


def check_load(m, name, dtype):
    """Rows held per rank, and the gathered weights against a plain from_pretrained (collective)."""
    reference = dict(model_module.Llama.from_pretrained(name, dtype=dtype).named_parameters())
    shares, worst = [], 0.0
    for n, p in m.named_parameters():
        if isinstance(p, DTensor):
            shares.append(p.to_local().shape[0] / p.shape[0])
            full = p.full_tensor()
        else:
            full = p
        worst = max(worst, float((full.detach().cpu().float() - reference[n].float()).abs().max()))
    report["load"] = {"max_share": max(shares, default=1.0), "n_sharded": len(shares), "max_abs_diff": worst}


original_load = distributed.load_model


def load_model(name, d, dtype, sharding, **kwargs):
    m = original_load(name, d, dtype, sharding, **kwargs)
    models.append(m)
    if sharding == "shard":
        check_load(m, name, dtype)
    return m


original_hidden = model_module.Llama.hidden_states


def hidden_states(self, input_ids, *args, **kwargs):
    report["calls"].append([torch.is_grad_enabled(), int(input_ids.shape[0])])
    return original_hidden(self, input_ids, *args, **kwargs)


original_backward = torch.Tensor.backward


def backward(self, *args, **kwargs):
    inspect_grads("before")
    result = original_backward(self, *args, **kwargs)
    inspect_grads("after")
    return result


original_close = distributed.close_distributed


def close_distributed(*args, **kwargs):
    """Drop the probe's reference to the model first: a sharded model must not outlive its process group."""
    models.clear()
    gc.collect()
    return original_close(*args, **kwargs)


distributed.load_model = load_model
model_module.Llama.hidden_states = hidden_states
torch.Tensor.backward = backward

if __name__ == "__main__":
    out, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    import eval as eval_module
    import train
    train.load_model = eval_module.load_model = load_model
    train.close_distributed = eval_module.close_distributed = close_distributed
    code = (train if script == "train" else eval_module).main(argv)
    Path(f"{out}.{os.environ.get('RANK', '0')}").write_text(json.dumps({"code": code, **report}))
    sys.exit(code)
