"""CUDA correctness: the same weights and seeds give the same samples, losses and client steps on
the GPU as on the CPU (run by tools/gpu_bench.sh on a lent machine)."""

import json

import torch

from collafuse.common.config import SamplerConfig
from collafuse.common.cut import Cut
from collafuse.diffusion.noise import row_keys, row_noise
from collafuse.diffusion.schedule import Scheduler
from collafuse.diffusion.split import server_message
from collafuse.engine.client import ClientParty
from collafuse.engine.server import ServerParty

torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(0)
cpu = ServerParty((1, 32, 32), "tiny", device="cpu")
gpu = ServerParty((1, 32, 32), "tiny", device="cuda")
gpu.model.load_state_dict(cpu.model.state_dict())
keys = row_keys(5, 0, 8)
noise_diff = float((row_noise(keys, torch.full((8,), 7), (1, 32, 32)) - row_noise(keys.cuda(), torch.full((8,), 7, device="cuda"), (1, 32, 32)).cpu()).abs().max())
cfg = SamplerConfig()
CUT = Cut(40, 100)
a = cpu.sampler(16).run([cpu.denoise_job("j", 6, CUT, 3, cfg)])["j"]
b = gpu.sampler(4).run([gpu.denoise_job("j", 6, CUT, 3, cfg)])["j"]  # rows retire in several transfers
graphed = ServerParty((1, 32, 32), "tiny", device="cuda", cuda_graphs=True)
graphed.model.load_state_dict(cpu.model.state_dict())
g = graphed.sampler(4).run([graphed.denoise_job("j", 6, CUT, 3, cfg)])["j"]  # buckets 4 and 2
compiled = ServerParty((1, 32, 32), "tiny", device="cuda", cuda_graphs=True, compile=True)
compiled.model.load_state_dict(cpu.model.state_dict())
compiled.warm_up(16)
c = compiled.sampler(16).run([compiled.denoise_job("j", 6, CUT, 3, cfg)])["j"]  # bucket 8, padded
msg = server_message(Scheduler(), torch.randn(16, 1, 32, 32), CUT, torch.Generator().manual_seed(0))
loss_cpu, loss_gpu = cpu.train_step([msg]).loss, gpu.train_step([msg]).loss
data = torch.rand(64, 1, 32, 32) * 2 - 1
clients = [ClientParty("c", 0.6, data, "tiny", device=d, seed=3) for d in ("cpu", "cuda")]
client_losses = [c.train_local(c.batch().x0) for c in clients]
print(json.dumps({"what": "cuda_correctness", "noise_max_abs_diff_cpu_gpu": noise_diff,
                  "sample_max_abs_diff": float((a - b).abs().max()), "sample_scale": float(a.abs().max()),
                  "graphed_sample_max_abs_diff": float((a - g).abs().max()),
                  "compiled_graphed_sample_max_abs_diff": float((a - c).abs().max()),
                  "train_loss_cpu": round(loss_cpu, 6), "train_loss_gpu": round(loss_gpu, 6),
                  "client_loss_cpu": round(client_losses[0], 6), "client_loss_gpu": round(client_losses[1], 6)}))
