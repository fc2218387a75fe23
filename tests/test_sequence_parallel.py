"""Sequence-parallel FLUX (host/sp_flux.py, issue 17), in-process on the CPU: ComfyUI's own Flux class
(small width, its real block code and attention) run as 2, 3 and 4 ranks in threads gives the output
of one rank to 1e-4 (fp32), uneven token and head splits included; deliberately broken variants
(attention over local tokens only; position ids not split) fail the same check, so it can fail; a
rank that raises aborts every rank instead of hanging; the fallback reasons are pure and exact."""
import sys

import pytest
import torch

from comfy_multigpu.policy.sequence_split import fallback_reason, head_groups, token_ranges

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def flux(comfyui_dir):
    if str(comfyui_dir) not in sys.path:
        sys.path.append(str(comfyui_dir))
    argv, sys.argv = sys.argv, ["main.py", "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.ops
        from comfy.ldm.flux.model import Flux
    finally:
        sys.argv = argv
    torch.manual_seed(0)
    model = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                 hidden_size=96, mlp_ratio=4.0, num_heads=6, depth=2, depth_single_blocks=2,
                 axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                 txt_ids_dims=[], dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else torch.randn(p.shape) * 0.02)
            if "norm" in name:
                p.fill_(1.0)          # RMSNorm scales of q and k: attention as sharp as a trained model's
    return model.eval().requires_grad_(False)


def inputs(height=10, width=6, tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, 16, height, width, generator=g), timestep=torch.tensor([0.7]),
                context=torch.randn(1, tokens, 64, generator=g), y=torch.randn(1, 32, generator=g),
                guidance=torch.tensor([3.5]))


def max_rel_error(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def one_rank(model, args):
    with torch.no_grad():
        return model._forward(args["x"], args["timestep"], args["context"], args["y"], args["guidance"],
                              transformer_options={})


def ranks(model, args, n):
    from comfy_multigpu.host.sp_flux import parallel_forward
    with torch.no_grad():
        return parallel_forward([model] * n, ["cpu"] * n, args["x"], args["timestep"], args["context"], args["y"],
                                args["guidance"], transformer_options={})[0]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_n_ranks_give_the_output_of_one(flux, n):
    # 5 x 3 = 15 image tokens + 7 text tokens = 22: uneven over 3 and 4 ranks; 6 heads: uneven over 4
    args = inputs()
    expected = one_rank(flux, args)
    got = ranks(flux, args, n)
    assert got.shape == expected.shape
    assert max_rel_error(got, expected) < TOLERANCE


def test_attention_over_local_tokens_only_fails_the_check(flux, monkeypatch):
    from comfy_multigpu.host import sp_flux

    def local_only(self, func, q, k, v, heads, *args, **kwargs):
        return func(q, k, v, heads, *args, **kwargs)
    monkeypatch.setattr(sp_flux._Rank, "attention", local_only)
    args = inputs()
    assert max_rel_error(ranks(flux, args, 2), one_rank(flux, args)) > 100 * TOLERANCE


def test_position_ids_not_split_fail_the_check(flux, monkeypatch):
    from comfy_multigpu.host import sp_flux
    split = sp_flux._Rank.split

    def unsplit_ids(self, args):
        out = split(self, args)
        length = out["img_ids"].shape[1]
        out["img_ids"] = args["img_ids"][:, :length]       # every rank positioned as the first one
        return out
    monkeypatch.setattr(sp_flux._Rank, "split", unsplit_ids)
    args = inputs()
    assert max_rel_error(ranks(flux, args, 2), one_rank(flux, args)) > 100 * TOLERANCE


def test_a_rank_that_raises_aborts_every_rank(flux, monkeypatch):
    from comfy_multigpu.host import sp_flux
    attention = sp_flux._Rank.attention

    def failing(self, func, q, k, v, heads, *args, **kwargs):
        if self.rank == 2:
            raise RuntimeError("rank 2 out of memory")
        return attention(self, func, q, k, v, heads, *args, **kwargs)
    monkeypatch.setattr(sp_flux._Rank, "attention", failing)
    with pytest.raises(RuntimeError, match="rank 2 out of memory"):
        ranks(flux, inputs(), 3)


def test_token_and_head_splits():
    parts = token_ranges(7, 15, 4)
    assert parts == [((0, 1), (0, 3)), ((1, 3), (3, 7)), ((3, 5), (7, 11)), ((5, 7), (11, 15))]
    assert [p.length for p in parts] == [4, 6, 6, 6]
    with pytest.raises(ValueError):
        token_ranges(3, 15, 4)
    assert head_groups(6, 4) == [(0, 1), (1, 3), (3, 4), (4, 6)]
    with pytest.raises(ValueError):
        head_groups(2, 3)


@pytest.mark.parametrize("kwargs, reason", [
    ({"heads": 2, "ranks": 3}, "2 attention heads, fewer than 3 GPUs"),
    ({"tokens": 1}, "1 image tokens cannot be split over 2 GPUs"),
    ({"text_tokens": 1}, "1 text tokens cannot be split over 2 GPUs"),
    ({"attention_mask": True}, "attention mask"),
    ({"control": True}, "ControlNet"),
    ({"timestep_zero": True}, "index_timestep_zero"),
    ({"foreign_override": True}, "another attention override"),
    ({"foreign_last_block": True}, "replaces the last single block"),
])
def test_every_fallback_has_its_reason(kwargs, reason):
    base = {"ranks": 2, "heads": 24, "tokens": 4352}
    assert fallback_reason(**{**base, **kwargs}) and reason in fallback_reason(**{**base, **kwargs})
    assert fallback_reason(**base) is None and fallback_reason(ranks=1, heads=1, tokens=1) is None


# ---- through the HTTP API on 4 CPU workers: the stock KSampler, the SequenceParallel node ----------

def latent_of(server, prompt, **submit):
    pid = server.submit(prompt, **submit)["prompt_id"]
    entry = server.wait(pid, timeout=180)[pid]
    assert entry["status"]["status_str"] == "success", entry["status"]
    return torch.tensor(entry["outputs"]["9"]["values"]), entry


def test_a_sequence_parallel_prompt_gives_the_one_gpu_latent_through_the_api(multi4):
    from helpers import workflows as wf
    expected, single = latent_of(multi4, wf.flux(1))
    assert "gpu_ids" not in single and single["sequence_parallel"]["fallback"] is None
    for n in (2, 3, 4):
        got, entry = latent_of(multi4, wf.flux(n))
        assert max_rel_error(got, expected) < TOLERANCE, n
        assert len(entry["gpu_ids"]) == n and entry["gpu_id"] == entry["gpu_ids"][0]
        note = entry["sequence_parallel"]
        assert {k: note[k] for k in ("gpus_asked", "gpus", "gpu_ids", "fallback")} == \
            {"gpus_asked": n, "gpus": n, "gpu_ids": entry["gpu_ids"], "fallback": None}
        assert note["forwards"] == 3 and note["exchanges"] > 0       # 3 steps; the ranks met
    assert "SequenceParallel: each FLUX forward on GPUs" in multi4.log()


def test_a_prompt_pinned_to_one_gpu_falls_back_and_says_why(multi4):
    from helpers import workflows as wf
    expected, _ = latent_of(multi4, wf.flux(1, seed=5))
    got, entry = latent_of(multi4, wf.flux(2, seed=5), gpu=3)
    assert torch.equal(got, expected) and entry["gpu_id"] == 3 and "gpu_ids" not in entry
    assert "only 1 GPU leased" in entry["sequence_parallel"]["fallback"]
    assert "SequenceParallel(gpus=2): running on one GPU: only 1 GPU leased" in multi4.log()


def test_the_header_runs_an_unchanged_workflow_on_several_gpus(multi4):
    from helpers import workflows as wf
    plain = wf.flux(1, seed=9)
    del plain["2"]                                  # no SequenceParallel node: the stock graph
    plain["5"]["inputs"]["model"] = ["1", 0]
    expected, single = latent_of(multi4, plain)
    assert "sequence_parallel" not in single
    got, entry = latent_of(multi4, plain, headers={"X-SEQUENCE-PARALLEL": "3"})
    assert max_rel_error(got, expected) < TOLERANCE
    assert len(entry["gpu_ids"]) == 3 and entry["sequence_parallel"]["gpus"] == 3
    auto, entry = latent_of(multi4, plain, headers={"X-SEQUENCE-PARALLEL": "auto"})
    assert max_rel_error(auto, expected) < TOLERANCE and len(entry["gpu_ids"]) == 4


@pytest.mark.parametrize("value", ["0", "9", "two", "1.5", ""])
def test_a_bad_header_value_is_a_400_naming_the_valid_ones(multi4, value):
    from helpers import workflows as wf
    from helpers.comfy_server import HttpError
    with pytest.raises(HttpError) as refused:
        multi4.submit(wf.flux(1), headers={"X-SEQUENCE-PARALLEL": value})
    body = refused.value.json()["error"]
    assert refused.value.status == 400 and body["type"] == "invalid_sequence_parallel"
    assert body["extra_info"]["valid"] == [str(n) for n in range(1, 9)] + ["auto"]


def test_the_drop_in_nodes_replace_the_stock_ones(multi4):
    from helpers import workflows as wf
    expected, _ = latent_of(multi4, wf.flux(1, seed=11))
    swapped = wf.flux(1, seed=11)
    del swapped["2"]
    swapped["1"] = {"class_type": "XDiTUNetLoader", "inputs": {"unet_name": wf.FLUX, "weight_dtype": "default",
                                                               "gpus": 2, "strategy": "round_robin"}}
    swapped["5"]["class_type"] = "XDiTKSampler"
    swapped["5"]["inputs"].update(model=["1", 0], gpus=2, strategy="round_robin")
    got, entry = latent_of(multi4, swapped)
    assert max_rel_error(got, expected) < TOLERANCE and len(entry["gpu_ids"]) == 2
    info = multi4.get("/object_info/XDiTKSampler")["XDiTKSampler"]
    stock = multi4.get("/object_info/KSampler")["KSampler"]
    assert info["output"] == stock["output"]
    assert set(info["input"]["required"]) == set(stock["input"]["required"]) | {"gpus", "strategy"}


# ---- Wan 2.x (host/sp_wan.py): ComfyUI's WanModel, text to video, at small width -----------------------

@pytest.fixture(scope="module")
def wan(flux):                                     # flux: ComfyUI already importable
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    torch.manual_seed(0)
    model = WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=64, ffn_dim=128, freq_dim=256,
                     text_dim=64, out_dim=16, num_heads=4, num_layers=3, qk_norm=True, cross_attn_norm=True,
                     eps=1e-6, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else torch.randn(p.shape) * 0.02)
            if "norm" in name:
                p.fill_(1.0)
    return model.eval().requires_grad_(False)


def wan_inputs(frames=2, height=10, width=6, tokens=7, seed=2):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, 16, frames, height, width, generator=g), timestep=torch.tensor([600.0]),
                context=torch.randn(1, tokens, 64, generator=g))


def wan_ranks(model, args, n):
    from comfy_multigpu.host.sp_wan import parallel_forward_wan
    with torch.no_grad():
        return parallel_forward_wan([model] * n, ["cpu"] * n, args["x"], args["timestep"], args["context"],
                                    transformer_options={})[0]


@pytest.mark.parametrize("n, tokens", [(2, 7), (3, 7), (4, 7), (2, 15)])
def test_wan_on_n_ranks_gives_the_output_of_one(wan, n, tokens):
    # 2 x 5 x 3 = 30 video tokens: uneven over 4; 15 text tokens = an even half: the split moves a token
    # so that cross-attention (15 keys) is never mistaken for self-attention
    args = wan_inputs(tokens=tokens)
    with torch.no_grad():
        expected = wan._forward(args["x"], args["timestep"], args["context"], transformer_options={})
    got = wan_ranks(wan, args, n)
    assert got.shape == expected.shape
    assert max_rel_error(got, expected) < TOLERANCE


def test_wan_with_local_only_self_attention_fails_the_check(wan, monkeypatch):
    from comfy_multigpu.host import sp_flux

    def local_only(self, func, q, k, v, heads, *args, **kwargs):
        return func(q, k, v, heads, *args, **kwargs)
    monkeypatch.setattr(sp_flux._Rank, "attention", local_only)
    args = wan_inputs()
    with torch.no_grad():
        expected = wan._forward(args["x"], args["timestep"], args["context"], transformer_options={})
    assert max_rel_error(wan_ranks(wan, args, 2), expected) > 100 * TOLERANCE


def test_wan_fallbacks(wan):
    from comfy_multigpu.host.sp_wan import wan_fallback
    args = wan_inputs()
    assert wan_fallback(wan, args["x"], args["timestep"], args["context"], {}, 2) is None
    assert "per-frame timesteps" in wan_fallback(wan, args["x"], torch.ones(1, 3), args["context"], {}, 2)
    assert "4 attention heads, fewer than 5" in wan_fallback(wan, args["x"], args["timestep"], args["context"], {}, 5)
    assert "extra latents" in wan_fallback(wan, args["x"], args["timestep"], args["context"], {}, 2,
                                           reference_latent=torch.zeros(1))


def test_a_wan_video_prompt_on_several_gpus_gives_the_one_gpu_latent(multi4):
    from helpers import workflows as wf
    expected, single = latent_of(multi4, wf.wan(1))
    assert len(single["outputs"]["9"]["shape"]) == 5                  # a video latent
    for n in (2, 4):
        got, entry = latent_of(multi4, wf.wan(n))
        assert max_rel_error(got, expected) < TOLERANCE, n
        assert entry["sequence_parallel"]["gpus"] == n and entry["sequence_parallel"]["fallback"] is None


def test_sequence_parallel_and_single_prompts_together_all_finish_with_the_lease_visible(multi4):
    import time
    from helpers import workflows as wf
    multi4.wait_idle()
    first = multi4.submit(wf.flux(2, seed=21, steps=150))["prompt_id"]
    deadline = time.time() + 60
    while True:
        leased = [q for q in multi4.get("/queue/all")["queues"] if q.get("lease", {}).get("prompt_id") == first]
        if leased or time.time() > deadline:
            break
        time.sleep(0.05)
    assert len(leased) == 2 and sorted(q["lease"]["rank"] for q in leased) == [0, 1]
    gpus = leased[0]["lease"]["gpus"]
    assert len(gpus) == 2 and sorted(q["gpu_id"] for q in leased) == sorted(gpus)   # gpus: rank order
    metrics = multi4.request("GET", "/metrics").decode()
    assert all(f'comfy_multigpu_lease_gpus{{gpu="{g}"}} 2.0' in metrics for g in gpus)
    cards = {c["gpu_id"]: c for c in multi4.get("/multigpu/state")["gpus"]}
    assert [cards[g]["lease"]["rank"] for g in gpus] == [0, 1]
    second = multi4.submit(wf.flux(2, seed=22))["prompt_id"]
    singles = [multi4.submit(wf.sleep(0.3, i))["prompt_id"] for i in range(3)]
    done = multi4.wait([first, second] + singles, timeout=240)
    assert all(e["status"]["status_str"] == "success" for e in done.values())
    assert len(done[second]["gpu_ids"]) == 2
    assert done[first]["sequence_parallel"]["exchanges"] > 0       # the ranks met at every exchange
