"""How far diffusers 0.42.1's stock AnyFlowFARPipeline is from the official causal sampler, at the real size.

    python benchmarks/far_padding_error.py [--partitions 1,3 1,3,3,3] [--steps 4] [--seed 0]
                                           [--heads 2 --head-dim 16 --layers 2 --ffn 64]

diffusers' ``AnyFlowCausalAttnProcessor`` pads queries and keys to a multiple of 128 tokens with zeros and no
mask when it denoises a chunk against the KV cache. At 480x832 (latent 60x104: 1560 tokens per latent frame)
no chunk is a multiple of 128, so zero keys join every softmax of that step. This script samples the same
noise and text three ways and compares the final latents (output_type="latent"):

  stock     AnyFlowFARPipeline as diffusers 0.42.1 ships it (flex attention, padded cache read)
  patched   the same pipeline after anystep.patch_far_pipeline(pipe)
  ours      anystep.causal.sample_causal on the same weights (dense attention on CPU)

The transformer is by default tiny in width (2 heads x 16, 2 layers, ffn 64; --heads/--head-dim/--layers/--ffn
change it), random weights with every parameter perturbed (a tiny VAE only for its scale factors), but it runs
the real token counts: full chunks of 1560
tokens per latent frame, compressed context chunks of 390. CPU, about a minute per partition on 2 cores.
The size of the stock error depends on the weights (a trained model with peakier attention gives the zero
keys less weight); the point is that it is not zero and that the patch removes it.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch


def build(partition: list[int], seed: int, size: dict):
    """The stock pipeline and a FAR student on the same random tiny-width weights."""
    from diffusers import AnyFlowFARPipeline, AnyFlowFARTransformer3DModel, FlowMapEulerDiscreteScheduler

    from anystep.models.far import CausalStudent, far_student_from_wan
    from anystep.models.tiny_folder import tiny_wan_components
    from anystep.models.wan import tiny_wan

    torch.manual_seed(seed)
    wan = tiny_wan(in_channels=16, text_dim=32, **size, rope_max_seq_len=1024)   # 52 width positions at 832 px
    far = far_student_from_wan(wan, chunk_partition=partition, attention="dense").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():    # Wan zero-inits some layers; make every weight matter
        for p in far.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    stock = AnyFlowFARTransformer3DModel.from_config(far.config).eval()   # diffusers' own processors
    stock.load_state_dict(far.state_dict())
    vae = tiny_wan_components(seed=seed)["vae"]     # only its scale factors are used (latent output)
    pipe = AnyFlowFARPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=stock,
                              scheduler=FlowMapEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe, CausalStudent(far)


def measure(partition: list[int], steps: int, seed: int, size: dict) -> dict:
    import anystep
    from anystep.causal import sample_causal

    pipe, student = build(partition, seed, size)
    frames = sum(partition)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(1, frames, 16, 60, 104, generator=g)        # (B, F, C, H, W): 480 x 832
    text = torch.randn(1, 16, 32, generator=g)

    def pipeline() -> torch.Tensor:
        out = pipe(prompt_embeds=text, height=480, width=832, num_frames=4 * (frames - 1) + 1,
                   num_inference_steps=steps, latents=noise.permute(0, 2, 1, 3, 4).clone(), output_type="latent",
                   chunk_partition=partition).frames
        return out if out.shape == noise.shape else out.permute(0, 2, 1, 3, 4)

    start = time.time()
    with torch.no_grad():
        stock = pipeline()
        anystep.patch_far_pipeline(pipe)
        patched = pipeline()
        ours = sample_causal(student, noise.clone(), text, steps=steps)
    bounds = [sum(partition[:c]) for c in range(len(partition) + 1)]
    per_chunk = [(stock - ours)[:, a:b].abs().max().item() for a, b in itertools.pairwise(bounds)]
    return {"partition": partition, "tokens per chunk": [1560 * n for n in partition], "per chunk": per_chunk,
            "stock vs ours": (stock - ours).abs().max().item(),
            "stock vs ours, mean": (stock - ours).abs().mean().item(),
            "patched vs ours": (patched - ours).abs().max().item(),
            "latent scale (max abs)": ours.abs().max().item(), "seconds": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", nargs="+", default=["1,3", "1,3,3,3"],
                        help="chunk partitions in latent frames (default: 1,3 and 1,3,3,3)")
    parser.add_argument("--steps", type=int, default=4, help="flow-map steps per chunk (default 4, official)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", type=int, default=2, help="attention heads (default 2; Wan2.1-1.3B: 12)")
    parser.add_argument("--head-dim", type=int, default=16, help="head dim (default 16; Wan2.1: 128)")
    parser.add_argument("--layers", type=int, default=2, help="blocks (default 2; Wan2.1-1.3B: 30)")
    parser.add_argument("--ffn", type=int, default=64, help="FFN width (default 64; Wan2.1-1.3B: 8960)")
    args = parser.parse_args()
    size = {"heads": args.heads, "head_dim": args.head_dim, "layers": args.layers, "ffn_dim": args.ffn}
    print(f"transformer: {size}, {args.steps} steps per chunk, seed {args.seed}")
    import warnings
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    print("| partition | tokens per chunk | max abs stock vs ours (per chunk) | mean abs stock vs ours | max abs "
          "patched vs ours | latent max abs | seconds |")
    print("|---|---|---|---|---|---|---|")
    for text in args.partitions:
        r = measure([int(n) for n in text.split(",")], args.steps, args.seed, size)
        chunks = ", ".join(f"{e:.2g}" for e in r["per chunk"])
        print(f"| {r['partition']} | {r['tokens per chunk']} | {r['stock vs ours']:.3g} ({chunks}) | "
              f"{r['stock vs ours, mean']:.3g} | {r['patched vs ours']:.2g} | {r['latent scale (max abs)']:.3g} | "
              f"{r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
