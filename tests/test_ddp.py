"""2-process torchrun (gloo, CPU) keeps ranks identical and matches a 1-process run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("_ddp_worker.py")


def _run(args, out, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    subprocess.run([sys.executable, *args, str(WORKER), str(out)], check=True, env=e, timeout=300,
                   capture_output=True)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"], tmp_path / "ddp")
    _run([], tmp_path / "single")
    r0 = load_file(tmp_path / "ddp" / "rank0_of2.safetensors")
    r1 = load_file(tmp_path / "ddp" / "rank1_of2.safetensors")
    one = load_file(tmp_path / "single" / "rank0_of1.safetensors")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
        torch.testing.assert_close(r0[k], one[k], atol=1e-5, rtol=1e-4)
    # the runs really trained: weights moved away from the shared initialisation
    torch.manual_seed(0)
    from seqebm.models.transformer import TransformerLM

    init = TransformerLM(20, d_model=32, n_layers=2, n_heads=2, max_len=32, dropout=0.0).state_dict()
    assert not torch.allclose(init["blocks.0.ff.fc1.weight"], one["blocks.0.ff.fc1.weight"])
