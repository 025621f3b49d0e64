"""CUDA graphs of the server's denoising forward: buckets, refusal off CUDA, and (on a GPU) the same
ε̂ as the eager forward, following the weights as they change."""

import subprocess

import pytest
import torch

from collafuse.engine.graphs import buckets
from collafuse.system.launch import cli
from collafuse.engine.server import ServerParty

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_buckets_cover_every_pool_size_without_doubling_a_full_pool():
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert buckets(1) == [1]
    for max_batch in (1, 5, 48, 64):
        assert all(any(b >= n for b in buckets(max_batch)) for n in range(1, max_batch + 1))


def test_cuda_graphs_off_cuda_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        ServerParty((1, 16, 16), "tiny", device="cpu", cuda_graphs=True)
    proc = subprocess.run(cli("worker", "--broker", "tcp://127.0.0.1:9", "--device", "cpu", "--cuda-graphs", "--insecure"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "CUDA graphs need a CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_graphed_forward_equals_eager_and_follows_the_weights(bf16):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    party = ServerParty((1, 32, 32), "tiny", device="cuda", autocast_bf16=bf16, cuda_graphs=True)
    party.model.eval()
    graphed = party.denoiser(8)
    tol = 3e-2 if bf16 else 1e-4
    with torch.no_grad():
        for n in (1, 3, 8):
            x = torch.randn(n, 1, 32, 32, device="cuda")
            t = torch.randint(41, 101, (n,), device="cuda")
            tc = torch.full((n,), 40, device="cuda")
            assert torch.allclose(graphed(x, t, tc).float(), party.eps(x, t, tc).float(), atol=tol, rtol=tol)
        for p in party.model.parameters():
            p.mul_(0.5)  # as an optimiser step or relayed weights would change them, in place
        assert torch.allclose(graphed(x, t, tc).float(), party.eps(x, t, tc).float(), atol=tol, rtol=tol)


@needs_cuda
def test_graphed_denoising_follows_the_trainers_optimiser_steps():
    """A trainer worker denoises with graphs between Adam steps: every replay sees the new weights."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    from collafuse.diffusion.split import ServerMessage

    party = ServerParty((1, 32, 32), "tiny", device="cuda", cuda_graphs=True)
    graphed = party.denoiser(8)
    x, t, tc = torch.randn(5, 1, 32, 32, device="cuda"), torch.randint(41, 101, (5,), device="cuda"), torch.full((5,), 40, device="cuda")
    before = graphed(x, t, tc).clone()
    for _ in range(3):
        party.train_step([ServerMessage(torch.randn(16, 1, 32, 32), torch.randint(41, 101, (16,)), torch.full((16,), 40), torch.randn(16, 1, 32, 32))])
        party.model.eval()
        with torch.no_grad():
            assert torch.allclose(graphed(x, t, tc), party.eps(x, t, tc), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(graphed(x, t, tc), before, atol=1e-3)  # the steps changed the output


@needs_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_graphed_forward_equals_eager_at_every_bucket_and_follows_the_weights(bf16):
    """The compiled forward, captured in the buckets, against the eager forward; then the weights
    change in place (an optimiser step, a relay's load) and the next replay sees them."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    from collafuse.diffusion.split import ServerMessage, row_losses

    party = ServerParty((1, 32, 32), "tiny", device="cuda", autocast_bf16=bf16, cuda_graphs=True, compile=True)
    reports = party.warm_up(64)
    graphed = party.denoiser(64)
    assert graphed.buckets == [8, 16, 32, 64] and "compiled" in reports[0].what
    tol = 5e-2 if bf16 else 1e-3

    def same(n: int) -> None:
        x = torch.randn(n, 1, 32, 32, device="cuda")
        t, tc = torch.randint(41, 101, (n,), device="cuda"), torch.full((n,), 40, device="cuda")
        with torch.no_grad():
            assert torch.allclose(graphed(x, t, tc).float(), party.eps(x, t, tc).float(), atol=tol, rtol=tol), n

    for n in (1, 5, 8, 9, 16, 31, 32, 64):  # every bucket, full and padded
        same(n)
    party.model.train()
    with party._autocast():
        loss = row_losses(party.model, ServerMessage(torch.randn(16, 1, 32, 32, device="cuda"), torch.randint(41, 101, (16,)),
                                                     torch.full((16,), 40), torch.randn(16, 1, 32, 32, device="cuda"))).float().mean()
    loss.backward()
    party.optimizer.step()  # in place
    party.model.eval()
    same(8)
    party.model.load_state_dict({k: v * 0.5 for k, v in party.model.state_dict().items()})  # in place, as a relay loads weights
    same(64)
