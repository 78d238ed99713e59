"""Worker for test_ddp.py: trains a tiny LM for a few steps and saves each rank's weights.

Run as ``torchrun --nproc_per_node=N tests/_ddp_worker.py OUT_DIR`` (or plainly for N=1).
"""

import os
import sys

import torch
from safetensors.torch import save_file

from seqebm.data.batching import PackedLMSource, pack_lm
from seqebm.models.transformer import TransformerLM
from seqebm.objectives import TeacherForcingLoss
from seqebm.training.config import OptimConfig, TrainerConfig
from seqebm.training.distributed import init_distributed
from seqebm.training.trainer import Trainer


def main(out: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(4, 20, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(80)]
    rows, lengths = pack_lm(docs, 16, bos_id=1, eos_id=2)
    torch.manual_seed(0)
    model = TransformerLM(20, d_model=32, n_layers=2, n_heads=2, max_len=32, dropout=0.0)
    trainer = Trainer(model, TeacherForcingLoss(), PackedLMSource(rows, lengths, 8, seed=1),
                      optim=OptimConfig(lr=3e-3, warmup_steps=2), dist_info=info,
                      train=TrainerConfig(max_steps=4, progress=False, checkpoint_every=100, eval_every=100),
                      run_dir=os.path.join(out, "run"))
    trainer.fit()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(tensors, os.path.join(out, f"rank{info.rank}_of{info.world_size}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
