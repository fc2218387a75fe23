"""Sequence-parallel FLUX.1, FLUX.2, Qwen-Image, Wan and HunyuanVideo (host/sp_*.py, issue 17), in-process on
the CPU: the host's own model classes (small width, their real block code and attention) run as 2, 3 and
4 ranks in threads give the output of one rank to 1e-4 (fp32), uneven token and head splits, reference
latents and ControlNet additions included; deliberately broken variants (attention over local tokens
only; position ids, RoPE or a ControlNet's additions cut wrongly) fail the same check, so it can fail; a
rank that raises aborts every rank instead of hanging; the fallback reasons are pure and exact. Through
the HTTP API on 4 CPU workers: generated FLUX.1, FLUX.2, Wan and HunyuanVideo checkpoints, the VAE
decode spread over the leased GPUs."""
import pytest
import torch

from comfy_multigpu.policy.sequence_split import fallback_reason, head_groups, token_ranges

TOLERANCE = 1e-4


def scaled_random_(model):
    """Random weights in place (matrices 1/sqrt(fan in), biases 0.02, norm scales 1: attention as sharp
    as a trained model's); the model in eval mode without gradients."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else torch.randn(p.shape) * 0.02)
            if "norm" in name:
                p.fill_(1.0)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def flux(comfyui_dir):
    from helpers.comfy_import import import_comfy
    comfy = import_comfy(comfyui_dir, "comfy.ops", "comfy.ldm.flux.model")
    Flux = comfy.ldm.flux.model.Flux
    torch.manual_seed(0)
    model = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                 hidden_size=96, mlp_ratio=4.0, num_heads=6, depth=2, depth_single_blocks=2,
                 axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                 txt_ids_dims=[], dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    return scaled_random_(model)


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


def test_rank_threads_get_the_callers_modes_and_a_stuck_rank_is_reported_not_waited_for():
    import time
    from comfy_multigpu.runtime.rank_group import RankAborted, RankGroup, run_ranks
    seen = {}

    def modes(rank):
        seen[rank] = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        return True
    with torch.inference_mode():
        run_ranks(RankGroup(["cpu"] * 3), modes)
    assert seen == {0: (True, False), 1: (True, False), 2: (True, False)}
    with torch.no_grad():
        run_ranks(RankGroup(["cpu"] * 2), modes)
    assert seen == {0: (False, False), 1: (False, False), 2: (True, False)}

    def late(rank):                                 # rank 1 never reaches the exchange in time
        if rank == 1:
            time.sleep(1.5)
            return True
        return group.all_gather(rank, torch.zeros(1))
    group = RankGroup(["cpu"] * 2, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(RankAborted, match="within 0.3 s"):             # the exchange's timeout, then
        run_ranks(group, late)                                         # rank 1 is not waited for either
    assert time.monotonic() - started < 1.4       # not waited for until it ended

    def stuck(rank):                               # rank 0 fails while rank 1 is busy elsewhere
        if rank == 1:
            time.sleep(2)
            return True
        raise RuntimeError("rank 0 out of memory")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 0 out of memory"):
        run_ranks(RankGroup(["cpu"] * 2, timeout=0.2), stuck)
    assert time.monotonic() - started < 1.5


def test_rank_copies_follow_the_weights_rank_0_runs_and_keep_nothing_of_them_alive():
    """A copy for another device is made from rank 0's module as it is (to "meta" here: no second
    device), reused while rank 0 holds the same tensors, remade when a weight was replaced (as
    ComfyUI's ModelPatcher replaces a weight it patches); the copy holds no reference to rank 0's
    tensors; a layer with tensor-subclass weights it does not move itself cannot be copied."""
    import gc
    import weakref
    from comfy_multigpu.host.rank_copies import RankCopies, uncopyable
    from comfy_multigpu.runtime import weight_views
    source = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    copies = RankCopies()
    first = copies.on(source, "meta")
    assert first is not source and first[0].weight.device.type == "meta" and source[0].weight.device.type == "cpu"
    assert copies.on(source, "meta") is first
    assert all(weight_views.shared_sources(m) is None for m in first.modules())
    replaced = weakref.ref(source[1].weight)
    source[1].weight = torch.nn.Parameter(torch.ones(2, 4))        # a LoRA patched into rank 0's weight
    second = copies.on(source, "meta")
    assert second is not first and len(copies) == 1
    del first
    gc.collect()
    assert replaced() is None                                       # nothing kept the replaced weight
    assert uncopyable(source) is None
    source[1].weight_function = [lambda w: w + 1]                   # a low-VRAM LoRA patch, weights unchanged
    third = copies.on(source, "meta")
    assert third is not second and copies.on(source, "meta") is third
    other = torch.nn.Linear(2, 2)                                   # a second model (Wan 2.2's other expert)
    assert copies.on(other, "meta") is not third and len(copies) == 1   # one copy per device: the old one went
    from comfy_multigpu.host.rank_copies import on_devices
    ranks = on_devices(source, ["cpu", "meta", "cpu", "meta"])      # rank 0's device: the module itself;
    assert ranks[0] is source and ranks[2] is source               # two ranks on one other device: one copy
    assert ranks[1] is ranks[3] and ranks[1] is not source and ranks[1][0].weight.device.type == "meta"

    class Wrapped(torch.Tensor):                                    # a GGUF-style weight
        pass
    source[0].weight = torch.nn.Parameter(torch.zeros(4, 4).as_subclass(Wrapped))
    assert "tensor subclass" in uncopyable(source)


def test_token_and_head_splits():
    parts = token_ranges(7, 15, 4)
    assert parts == [((0, 1), (0, 3)), ((1, 3), (3, 7)), ((3, 5), (7, 11)), ((5, 7), (11, 15))]
    assert [p.length for p in parts] == [4, 6, 6, 6]
    with pytest.raises(ValueError):
        token_ranges(3, 15, 4)
    assert head_groups(6, 4) == [(0, 1), (1, 3), (3, 4), (4, 6)]
    from comfy_multigpu.policy.sequence_split import split_avoiding
    for count, ranks, avoid, spread in ((1544, 3, {514, 521, 7}, 3), (772, 3, {257, 264, 7}, 2),
                                        (30, 2, {15, 22, 7}, 2), (514, 2, {257}, 2), (60, 4, {14, 15, 16}, 6)):
        parts = split_avoiding(count, ranks, avoid)
        lengths = [b - a for a, b in parts]
        assert parts[0][0] == 0 and parts[-1][1] == count and all(a == b for (_, a), (b, _) in zip(parts, parts[1:]))
        assert not set(lengths) & avoid and max(lengths) - min(lengths) <= spread, (count, ranks, lengths)
    with pytest.raises(ValueError):
        head_groups(2, 3)


@pytest.mark.parametrize("kwargs, reason", [
    ({"heads": 2, "ranks": 3}, "2 attention heads, fewer than 3 GPUs"),
    ({"tokens": 1}, "1 image tokens cannot be split over 2 GPUs"),
    ({"text_tokens": 1}, "1 text tokens cannot be split over 2 GPUs"),
    ({"attention_mask": True}, "attention mask"),
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
    swapped.update({                                # and a stock VAEDecodeTiled: its tiles on both GPUs
        "20": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": wf.CHECKPOINT}},
        "21": {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 96, "batch_size": 1}},
        "22": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["21", 0], "vae": ["20", 2], "tile_size": 64,
                                                          "overlap": 16, "temporal_size": 64, "temporal_overlap": 8}},
        "23": {"class_type": "PreviewImage", "inputs": {"images": ["22", 0]}}})
    got, entry = latent_of(multi4, swapped)
    assert max_rel_error(got, expected) < TOLERANCE and len(entry["gpu_ids"]) == 2
    vae = entry["sequence_parallel"]["vae"]          # 12 x 12 latent, tiles of 8 (4x16, 16x4, 8x8) overlapping 2
    assert vae == {"tiles": 14, "gpus": entry["gpu_ids"], "tiles_per_gpu": [7, 7], "fallback": None, "decodes": 1}
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
    return scaled_random_(model)


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


@pytest.mark.parametrize("n, shape, clip", [(3, (1, 4, 193), 257), (3, (2, 10, 6), 257), (3, (1, 4, 386), 514)])
def test_wan_image_to_video_on_n_ranks_gives_the_output_of_one(wan, n, shape, clip):
    """Wan 2.1 image to video (CLIP image tokens before the text in the context, two cross-attentions):
    514 video tokens over 2 ranks would give each exactly 257 (the image tokens' count) or 514 (first-last
    frame): the split moves a token so that no cross-attention is taken for the self-attention."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    from comfy_multigpu.host.sp_wan import parallel_forward_wan
    torch.manual_seed(0)
    model = WanModel(model_type="i2v", patch_size=(1, 2, 2), in_dim=16, dim=64, ffn_dim=128, freq_dim=256,
                     text_dim=64, out_dim=16, num_heads=4, num_layers=2, qk_norm=True, cross_attn_norm=True, eps=1e-6,
                     flf_pos_embed_token_number=clip if clip != 257 else None, dtype=torch.float32,
                     operations=comfy.ops.disable_weight_init)
    scaled_random_(model)
    g = torch.Generator().manual_seed(4)
    frames, height, width = shape
    x = torch.randn(1, 16, frames, 2 * height, 2 * width, generator=g)
    context, clip_fea = torch.randn(1, 7, 64, generator=g), torch.randn(1, clip, 1280, generator=g)
    with torch.no_grad():
        expected = model._forward(x, torch.tensor([600.0]), context, clip_fea, transformer_options={})
        got = parallel_forward_wan([model] * n, ["cpu"] * n, x, torch.tensor([600.0]), context, clip_fea,
                                   transformer_options={})[0]
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
    for kind in ("attn1_patch", "attn2_patch", "double_block"):
        assert kind in wan_fallback(wan, args["x"], args["timestep"], args["context"], {"patches": {kind: [print]}}, 2)


def test_flux_falls_back_for_patches_that_would_see_one_ranks_tokens(flux):
    from comfy_multigpu.host.sp_flux import flux_fallback
    args = inputs()

    def why(options):
        return flux_fallback(flux, args["x"], args["context"], options, 2)
    assert why({}) is None and why({"patches": {"attn1_patch": []}}) is None
    assert "(attn1_patch)" in why({"patches": {"attn1_patch": [print]}})
    assert "(attn1_output_patch)" in why({"patches": {"attn1_output_patch": [print]}})
    assert "replaces the last single block" in why({"patches_replace": {"dit": {("single_block", 1): print}}})


def test_a_wan_video_prompt_on_several_gpus_gives_the_one_gpu_latent(multi4):
    from helpers import workflows as wf
    expected, single = latent_of(multi4, wf.wan(1))
    assert len(single["outputs"]["9"]["shape"]) == 5                  # a video latent
    for n in (2, 4):
        got, entry = latent_of(multi4, wf.wan(n))
        assert max_rel_error(got, expected) < TOLERANCE, n
        assert entry["sequence_parallel"]["gpus"] == n and entry["sequence_parallel"]["fallback"] is None
    assert "SequenceParallel: each Wan forward on GPUs" in multi4.log()


# ---- FLUX.2 and reference latents (the same Flux class), Qwen-Image (host/sp_qwen.py) ------------------

@pytest.fixture(scope="module")
def flux2(flux):                                   # flux: ComfyUI already importable
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    torch.manual_seed(0)
    model = Flux(image_model="flux2", in_channels=32, out_channels=32, vec_in_dim=None, context_in_dim=64,
                 hidden_size=96, mlp_ratio=3.0, num_heads=6, depth=2, depth_single_blocks=2, axes_dim=[4, 4, 4, 4],
                 theta=2000, patch_size=1, qkv_bias=False, guidance_embed=True, global_modulation=True,
                 mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0,
                 txt_ids_dims=[3], dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    return scaled_random_(model)


@pytest.fixture(scope="module")
def qwen(flux):
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=3,
                                        attention_head_dim=16, num_attention_heads=6, joint_attention_dim=48,
                                        axes_dims_rope=(4, 6, 6), dtype=torch.float32,
                                        operations=comfy.ops.disable_weight_init)
    return scaled_random_(model)


def flux_with_reference(model, channels, n, reference: bool, seed=3):
    """(one rank's output, n ranks') of a Flux-class model with 5 x 3 image tokens (patch 1) or 5 x 3
    (patch 2 over 10 x 6), 7 text tokens and, with `reference`, an edit's reference latent (4 x 3 tokens
    more, split with the image's)."""
    from comfy_multigpu.host.sp_flux import parallel_forward
    g = torch.Generator().manual_seed(seed)
    scale = model.patch_size
    x = torch.randn(1, channels, 5 * scale, 3 * scale, generator=g)
    context = torch.randn(1, 7, 64, generator=g)
    y = torch.randn(1, 32, generator=g) if model.params.vec_in_dim else None
    refs = [torch.randn(1, channels, 4 * scale, 3 * scale, generator=g)] if reference else None
    t, guidance = torch.tensor([0.7]), torch.tensor([3.5])
    with torch.no_grad():
        one = model._forward(x, t, context, y, guidance, refs, transformer_options={})
        return one, parallel_forward([model] * n, ["cpu"] * n, x, t, context, y, guidance, refs,
                                     transformer_options={})[0]


@pytest.mark.parametrize("n, reference", [(2, False), (3, True), (4, False), (4, True)])
def test_flux2_and_reference_latents_on_n_ranks_give_the_output_of_one(flux, flux2, n, reference):
    # FLUX.2 (global modulation, text position ids, 6 heads: uneven over 4); its edit references ("index")
    # and FLUX.1 Kontext's ("offset") are image tokens like the others, split with them
    expected, got = flux_with_reference(flux2, 32, n, reference)
    assert got.shape == expected.shape and max_rel_error(got, expected) < TOLERANCE
    if reference:
        expected, got = flux_with_reference(flux, 16, n, reference)
        assert max_rel_error(got, expected) < TOLERANCE


@pytest.fixture(scope="module")
def controlnet(flux):
    """The host's FLUX ControlNet (ControlNetFlux, latent input) at the tiny FLUX's width, 2 + 2 blocks:
    its additions repeat each block's tensor over the main model's 19 + 38 blocks."""
    import comfy.ops
    from comfy.ldm.flux.controlnet import ControlNetFlux
    torch.manual_seed(1)
    model = ControlNetFlux(latent_input=True, image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32,
                           context_in_dim=64, hidden_size=96, mlp_ratio=4.0, num_heads=6, depth=2,
                           depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True,
                           guidance_embed=True, txt_ids_dims=[], dtype=torch.float32,
                           operations=comfy.ops.disable_weight_init)
    return scaled_random_(model)


@pytest.mark.parametrize("n, reference", [(2, False), (3, True), (4, False)])
def test_a_controlnet_runs_on_n_ranks_with_its_additions_cut_per_rank(flux, controlnet, n, reference):
    """The additions of a ControlNet cover the image tokens (not a reference's): each rank adds its
    share, the gathering block the whole; the result is one rank's, and the control changed it."""
    from comfy_multigpu.host.sp_flux import parallel_forward
    args = inputs()
    g = torch.Generator().manual_seed(9)
    refs = [torch.randn(1, 16, 8, 6, generator=g)] if reference else None
    with torch.no_grad():
        control = controlnet(args["x"], args["timestep"], args["context"], args["y"], args["guidance"],
                             hint=torch.randn(args["x"].shape, generator=g))
        call = (args["x"], args["timestep"], args["context"], args["y"], args["guidance"], refs)
        plain = flux._forward(*call, None, {})
        expected = flux._forward(*call, control, {})
        got = parallel_forward([flux] * n, ["cpu"] * n, *call, control, transformer_options={})[0]
    assert max_rel_error(plain, expected) > 0.1                     # the control matters
    assert max_rel_error(got, expected) < TOLERANCE


def test_a_control_cut_at_the_gathering_block_too_fails_the_check(flux, controlnet, monkeypatch):
    from comfy_multigpu.host import sp_flux
    from comfy_multigpu.host.sp_flux import parallel_forward
    control_of = sp_flux._Rank.control
    monkeypatch.setattr(sp_flux._Rank, "control", lambda self, control, whole: control_of(self, control, None))
    args = inputs()
    with torch.no_grad():
        control = controlnet(args["x"], args["timestep"], args["context"], args["y"], args["guidance"],
                             hint=torch.randn(args["x"].shape, generator=torch.Generator().manual_seed(9)))
        call = (args["x"], args["timestep"], args["context"], args["y"], args["guidance"], None, control)
        expected = flux._forward(*call, {})
        got = parallel_forward([flux] * 2, ["cpu"] * 2, *call, transformer_options={})[0]
    assert max_rel_error(got, expected) > 100 * TOLERANCE


def qwen_controlnet(qwen):
    """The host's Qwen-Image ControlNet (InstantX, QwenImageControlNetModel) at the tiny model's width."""
    import comfy.ops
    from comfy.ldm.qwen_image.controlnet import QwenImageControlNetModel
    torch.manual_seed(2)
    return scaled_random_(QwenImageControlNetModel(patch_size=2, in_channels=64, out_channels=16, num_layers=3,
                                                   attention_head_dim=16, num_attention_heads=6,
                                                   joint_attention_dim=48, axes_dims_rope=(4, 6, 6),
                                                   dtype=torch.float32, operations=comfy.ops.disable_weight_init))


def qwen_inputs(reference=False, frames=1, tokens=7, seed=4):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, 16, frames, 10, 6, generator=g), timestep=torch.tensor([0.7]),
                context=torch.randn(1, tokens, 48, generator=g),
                ref_latents=[torch.randn(1, 16, 1, 6, 6, generator=g)] if reference else None)


def qwen_one_and_ranks(model, args, n, **kwargs):
    from comfy_multigpu.host.sp_qwen import parallel_forward_qwen
    with torch.no_grad():
        one = model._forward(args["x"], args["timestep"], args["context"], None, args["ref_latents"],
                             transformer_options={}, **kwargs)
        return one, parallel_forward_qwen([model] * n, ["cpu"] * n, args["x"], args["timestep"], args["context"],
                                          None, args["ref_latents"], transformer_options={}, **kwargs)[0]


@pytest.mark.parametrize("n, variant", [(2, "image"), (3, "edit"), (4, "image"), (4, "edit"), (3, "layered"),
                                        (3, "control"), (2, "edit+control")])
def test_qwen_image_on_n_ranks_gives_the_output_of_one(qwen, n, variant):
    # 5 x 3 = 15 image tokens (+ 9 of an edit's reference) and 7 text tokens: uneven over 2, 3 and 4;
    # 6 heads; Layered: 2 layers as frames and its reference at a negative index; a ControlNet's
    # additions (one per block, over the image tokens) cut per rank, the last block's whole
    args = qwen_inputs(reference="edit" in variant or variant == "layered", frames=2 if variant == "layered" else 1)
    kwargs = {"ref_latents_method": "negative_index"} if variant == "layered" else {}
    if variant == "control":                   # the host's InstantX ControlNet: one addition per block, repeated
        with torch.no_grad():
            kwargs["control"] = qwen_controlnet(qwen)(args["x"], args["timestep"], args["context"],
                                                      hint=torch.randn(args["x"].shape))
    elif "control" in variant:                 # Fun-style: blocks without an addition have None
        g = torch.Generator().manual_seed(6)
        kwargs["control"] = {"input": [torch.randn(1, 15, 96, generator=g), None, torch.randn(1, 15, 96, generator=g)]}
    expected, got = qwen_one_and_ranks(qwen, args, n, **kwargs)
    if "control" in variant:
        plain, _ = qwen_one_and_ranks(qwen, args, 1)
        assert max_rel_error(plain, expected) > 0.01                # the control matters
    assert got.shape == expected.shape and max_rel_error(got, expected) < TOLERANCE


def test_qwen_image_with_local_only_attention_fails_the_check(qwen, monkeypatch):
    from comfy_multigpu.host import sp_flux

    def local_only(self, func, q, k, v, heads, *args, **kwargs):
        return func(q, k, v, heads, *args, **kwargs)
    monkeypatch.setattr(sp_flux._Rank, "attention", local_only)
    expected, got = qwen_one_and_ranks(qwen, qwen_inputs(), 2)
    assert max_rel_error(got, expected) > 100 * TOLERANCE


def test_qwen_image_fallbacks(qwen):
    from comfy_multigpu.host.sp_qwen import qwen_fallback
    args = qwen_inputs(reference=True)

    def why(n=2, options=None, **kwargs):
        return qwen_fallback(qwen, args["x"], args["context"], options or {}, n, **kwargs)
    assert why() is None and why(ref_latents=args["ref_latents"]) is None
    assert "6 attention heads, fewer than 7" in why(7)
    assert "attention mask" in why(attention_mask=torch.ones(1, 7))
    assert "index_timestep_zero" in why(ref_latents=args["ref_latents"], ref_latents_method="index_timestep_zero")
    qwen.default_ref_method = "index_timestep_zero"                 # a 2511 checkpoint: its references
    try:                                                            # without a method given
        assert "index_timestep_zero" in why(ref_latents=args["ref_latents"]) and why() is None
    finally:
        qwen.default_ref_method = "index"
    assert "another patch" in why(options={"patches": {"double_block": [print]}})
    assert "a replace of a double_block" in why(options={"patches_replace": {"dit": {("double_block", 0): print}}})
    assert "attn1_patch" in why(options={"patches": {"attn1_patch": [print]}})
    assert "another attention override" in why(options={"optimized_attention_override": print})


@pytest.fixture(scope="module")
def hunyuan(flux):
    """ComfyUI's HunyuanVideo class at small width: video (patch 1 x 2 x 2), as HunyuanImage 2.1 builds
    it (patch 2 x 2), and as HunyuanVideo 1.5 (ByT5 and vision streams joining the text, condition-type
    embeddings, meanflow's second timestep from the sampler's sigmas; no pooled vector, no guidance)."""
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    config = dict(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=96, mlp_ratio=4.0,
                  num_heads=6, depth=2, depth_single_blocks=2, theta=256, qkv_bias=True, guidance_embed=True,
                  byt5=False, meanflow=False, use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False,
                  dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    torch.manual_seed(0)
    v15 = dict(config, vec_in_dim=None, guidance_embed=False, byt5=True, meanflow=True, use_cond_type_embedding=True,
               vision_in_dim=32, meanflow_sum=True)
    return {"video": scaled_random_(HunyuanVideo(axes_dim=[4, 6, 6], patch_size=[1, 2, 2], **config)),
            "image": scaled_random_(HunyuanVideo(axes_dim=[8, 8], patch_size=[2, 2], **config)),
            "1.5": scaled_random_(HunyuanVideo(axes_dim=[4, 6, 6], patch_size=[1, 2, 2], **v15))}


def hunyuan_inputs(kind="video", seed=7):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 16, 2, 10, 6) if kind == "video" else (1, 16, 10, 6)
    return dict(x=torch.randn(shape, generator=g), timestep=torch.tensor([0.7]),
                context=torch.randn(1, 7, 48, generator=g), y=torch.randn(1, 32, generator=g),
                guidance=torch.tensor([6.0]), ref_latent=torch.randn(1, 16, 1, 10, 6, generator=g))


def hunyuan_one_and_ranks(model, args, n, transformer_options=None, txt_byt5=None, clip_fea=None, **kwargs):
    from comfy_multigpu.host.sp_hunyuan import parallel_forward_hunyuan
    call = (args["x"], args["timestep"], args["context"], args["y"], txt_byt5, clip_fea, args["guidance"])
    with torch.no_grad():
        one = model._forward(*call, transformer_options=dict(transformer_options or {}), **kwargs)
        return one, parallel_forward_hunyuan([model] * n, ["cpu"] * n, *call, transformer_options=transformer_options,
                                             **kwargs)[0]


@pytest.mark.parametrize("n, variant", [(2, "video"), (3, "video"), (4, "video"), (3, "reference"), (2, "image"),
                                        (4, "image"), (3, "control"), (3, "1.5")])
def test_hunyuan_video_on_n_ranks_gives_the_output_of_one(hunyuan, n, variant):
    # 2 x 5 x 3 = 30 video tokens (+ 15 of a reference latent, prepended) or 15 image tokens, 7 text
    # tokens, 6 heads: uneven over 4; a ControlNet's additions (double blocks: every video token)
    kind = "image" if variant == "image" else "video"
    args = hunyuan_inputs(kind)
    kwargs = {"ref_latent": args["ref_latent"]} if variant == "reference" else {}
    if variant == "1.5":                       # 5 ByT5 + 4 vision tokens join the 7 text tokens
        g = torch.Generator().manual_seed(9)
        args.update(y=None, guidance=None)
        kwargs = {"txt_byt5": torch.randn(1, 5, 1472, generator=g), "clip_fea": torch.randn(1, 4, 32, generator=g),
                  "transformer_options": {"sigmas": torch.tensor([0.7]), "sample_sigmas": torch.tensor([0.9, 0.7, 0.0])}}
    if variant == "control":
        g = torch.Generator().manual_seed(8)
        kwargs["control"] = {"input": [torch.randn(1, 30, 96, generator=g), None],
                             "output": [torch.randn(1, 30, 96, generator=g) for _ in range(2)]}
    expected, got = hunyuan_one_and_ranks(hunyuan["1.5" if variant == "1.5" else kind], args, n, **kwargs)
    assert got.shape == expected.shape and max_rel_error(got, expected) < TOLERANCE


def test_hunyuan_video_with_rope_not_split_fails_the_check(hunyuan, monkeypatch):
    from comfy_multigpu.host import sp_hunyuan
    double = sp_hunyuan._HunyuanRank.double

    def first_positions(self, index):
        run = double(self, index)

        def wrong(args, extra):
            out = run(args, extra)
            if index == 0:                          # later blocks: the first tokens' frequencies on every rank
                self.pe = args["pe"][:, :, :self.pe.shape[2]]
            return out
        return wrong
    monkeypatch.setattr(sp_hunyuan._HunyuanRank, "double", first_positions)
    expected, got = hunyuan_one_and_ranks(hunyuan["video"], hunyuan_inputs(), 2)
    assert max_rel_error(got, expected) > 10 * TOLERANCE            # about 100x: small RoPE dims at theta 256


def test_hunyuan_video_fallbacks(hunyuan):
    from comfy_multigpu.host.sp_hunyuan import hunyuan_fallback
    args = hunyuan_inputs()

    def why(n=2, options=None, **kwargs):
        return hunyuan_fallback(hunyuan["video"], args["x"], args["context"], options or {}, n, **kwargs)
    assert why() is None and why(4) is None
    assert "6 attention heads, fewer than 7" in why(7)
    assert "attention mask" in why(attention_mask=torch.ones(1, 7))
    assert "guiding_frame_index" in why(guiding_frame_index=torch.tensor([0.0]))
    assert "another patch" in why(options={"patches_replace": {"dit": {("single_block", 0): print}}})
    assert "(attn1_patch)" in why(options={"patches": {"attn1_patch": [print]}})     # it would see one rank's q, k, v
    assert "attn1_output_patch" in why(options={"patches": {"attn1_output_patch": [print]}})
    assert "another attention override" in why(options={"optimized_attention_override": print})


def test_the_node_runs_each_family_on_the_leased_gpus_and_names_it(flux2, qwen, hunyuan):
    """The SequenceParallel wrapper as a sampler calls it (the executor: the model's own forward) for
    FLUX.2, Qwen-Image and HunyuanVideo: the one-rank output, the lease's GPUs in the history note."""
    from comfy_multigpu.host.sp_nodes import SequenceParallelWrapper, model_family
    from comfy_multigpu.runtime.context import current_worker
    g = torch.Generator().manual_seed(5)
    cases = {"FLUX": (flux2, (torch.randn(1, 32, 5, 3, generator=g), torch.tensor([0.7]),
                              torch.randn(1, 7, 64, generator=g), None, torch.tensor([3.5]))),
             "Qwen-Image": (qwen, (qwen_inputs()["x"], torch.tensor([0.7]), qwen_inputs()["context"])),
             "HunyuanVideo": (hunyuan["video"], tuple(hunyuan_inputs()[k] for k in ("x", "timestep", "context", "y"))
                              + (None, None, torch.tensor([6.0])))}
    for family, (model, args) in cases.items():
        assert model_family(model)[0] == family

        class Executor:
            class_obj = model

            def __call__(self, *a, **k):
                return model._forward(*a, **k)
        worker, lease = leased([2, 0, 3])
        token = current_worker.set(worker)
        try:
            with torch.no_grad():
                expected = model._forward(*args, transformer_options={})
                got = SequenceParallelWrapper(3)(Executor(), *args, transformer_options={})
        finally:
            current_worker.reset(token)
        assert max_rel_error(got, expected) < TOLERANCE, family
        note = lease.notes["sequence_parallel"]
        assert note["gpu_ids"] == [2, 0, 3] and note["fallback"] is None and note["forwards"] == 1, family
    assert model_family(torch.nn.Linear(2, 2)) == (None, None)


def test_a_flux2_prompt_on_several_gpus_gives_the_one_gpu_latent(multi4):
    """A generated FLUX.2 checkpoint (the host detects it as Flux2 with no missing or unexpected keys)
    through the API: the host pads its text to 512 tokens; 5 x 3 image tokens."""
    from helpers import workflows as wf
    expected, single = latent_of(multi4, wf.flux2(1))
    assert single["outputs"]["9"]["shape"] == [1, 128, 3, 5]
    for n in (2, 3, 4):
        got, entry = latent_of(multi4, wf.flux2(n))
        assert max_rel_error(got, expected) < TOLERANCE, n
        assert entry["sequence_parallel"]["gpus"] == n and entry["sequence_parallel"]["fallback"] is None
    log = multi4.log()
    assert "unet missing" not in log and "unet unexpected" not in log


def test_a_hunyuan_video_prompt_on_several_gpus_gives_the_one_gpu_latent(multi4):
    """A generated HunyuanVideo 1.0 checkpoint (detected with no missing or unexpected keys) through the API."""
    from helpers import workflows as wf
    expected, single = latent_of(multi4, wf.hunyuan(1))
    assert single["outputs"]["9"]["shape"] == [1, 16, 2, 4, 6]
    for n in (2, 4):
        got, entry = latent_of(multi4, wf.hunyuan(n))
        assert max_rel_error(got, expected) < TOLERANCE, n
        assert entry["sequence_parallel"]["gpus"] == n and entry["sequence_parallel"]["fallback"] is None
    assert "SequenceParallel: each HunyuanVideo forward on GPUs" in multi4.log()


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


# ---- VAE decode on the leased GPUs (host/sp_vae.py): the host's tiled decode, its tiles on N ranks --------

def random_weights(module, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(t.shape, generator=g) * 0.02 if name.endswith("bias") else
            torch.ones(t.shape) if t.ndim == 1 else torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5
            for name, t in module.state_dict().items()}


@pytest.fixture(scope="module")
def vaes(flux, comfyui_dir):                        # flux: ComfyUI already importable
    """comfy.sd.VAE objects as the host builds them, small: an SD-type AutoencoderKL (images, three tile
    shapes averaged) and a Wan 2.1 VAE found by its keys (video, tiled in time and space)."""
    from helpers.comfy_import import import_comfy
    comfy = import_comfy(comfyui_dir, "comfy.sd", "comfy.ldm.wan.vae", "comfy.ldm.models.autoencoder")
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    sd_weights = random_weights(comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4), 1)
    image = comfy.sd.VAE(sd=sd_weights, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}}, dtype=torch.float32)
    wan = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], image_channels=3, conv_out_channels=3)
    video = comfy.sd.VAE(sd=random_weights(wan, 2), dtype=torch.float32)
    assert type(video.first_stage_model).__name__ == "WanVAE" and not video.handles_tiling
    g = torch.Generator().manual_seed(3)
    return {"sd": (image, torch.randn(1, 4, 14, 10, generator=g), {"tile_x": 6, "tile_y": 6, "overlap": 2}),
            "wan": (video, torch.randn(1, 16, 3, 10, 8, generator=g),
                    {"tile_x": 4, "tile_y": 4, "overlap": 1, "tile_t": 2, "overlap_t": 1})}


class CountingDecoder:
    """A rank's decoder that counts its tiles and the threads that decoded them."""

    def __init__(self, decoder):
        self.decoder, self.tiles, self.threads = decoder, 0, set()

    def decode(self, z):
        import threading
        self.tiles += 1
        self.threads.add(threading.get_ident())
        return self.decoder.decode(z)


def host_and_spread(vae, latent, tiles, n, decoders=None):
    import comfy.sd
    from comfy_multigpu.host.sp_vae import spread_decode_tiled
    with torch.inference_mode():                    # as ComfyUI runs nodes
        expected = vae.decode_tiled(latent, **tiles)
        got, result = spread_decode_tiled(comfy.sd.VAE.decode_tiled, vae, latent, ["cpu"] * n, decoders=decoders,
                                          **tiles)
    return expected, got, result


@pytest.mark.parametrize("kind, n", [("sd", 2), ("sd", 3), ("wan", 2), ("wan", 3)])
def test_vae_tiles_on_n_ranks_give_the_hosts_tiled_decode_bit_for_bit(vaes, kind, n):
    vae, latent, tiles = vaes[kind]
    decoders = [CountingDecoder(vae.first_stage_model) for _ in range(n)]
    expected, got, result = host_and_spread(vae, latent, tiles, n, decoders)
    assert got.shape == expected.shape and torch.equal(got, expected)          # fp32 on CPU: identical
    assert [d.tiles for d in decoders] == result.per_rank and result.missed == 0
    assert min(result.per_rank) >= result.tiles // n >= 3                         # every rank decoded its share
    assert len(set().union(*(d.threads for d in decoders))) == n                # each rank in its own thread


@pytest.mark.parametrize("kind", ["sd", "wan"])
def test_vae_tiles_placed_in_a_wrong_order_fail_the_check(vaes, kind, monkeypatch):
    from comfy_multigpu.host import sp_vae

    def swapped(self, index):                       # each tile trades places with a neighbour of its shape
        other = index ^ 1
        if other < len(self.outputs) and self.outputs[other].shape == self.outputs[index].shape:
            return self.outputs[other]
        return self.outputs[index]
    monkeypatch.setattr(sp_vae._Tiles, "output_for", swapped)
    vae, latent, tiles = vaes[kind]
    expected, got, _ = host_and_spread(vae, latent, tiles, 2)
    assert (got - expected).abs().max().item() > 1e-2


def leased(gpus, notes=None):
    """current_worker's view of a prompt holding `gpus` CPU workers (rank 0 first)."""
    import types
    lease = types.SimpleNamespace(gpu_ids=tuple(gpus), notes={} if notes is None else notes)
    pool = types.SimpleNamespace(workers={})
    for g in gpus:
        pool.workers[g] = types.SimpleNamespace(gpu_id=g, device=torch.device("cpu"), lease=lease, pool=pool)
    return pool.workers[gpus[0]], lease


def test_the_decode_patches_spread_a_leased_prompts_tiles_and_note_what_they_did(vaes, comfyui_dir, monkeypatch):
    import comfy.sd
    from helpers.comfy_import import import_comfy
    from comfy_multigpu.host.sp_vae import WHOLE_DECODE, make_vae_decode, make_vae_decode_tiled, with_tiled_decode
    from comfy_multigpu.runtime.context import current_worker
    import_comfy(comfyui_dir, "nodes")
    import nodes
    original = comfy.sd.VAE.decode_tiled
    decode_tiled = make_vae_decode_tiled(original, None)
    decode = make_vae_decode(comfy.sd.VAE.decode, None)
    monkeypatch.setattr(comfy.sd.VAE, "decode_tiled", decode_tiled)       # as the manifest installs it
    vae, latent, tiles = vaes["sd"]
    worker, lease = leased([2, 0, 3])
    token = current_worker.set(worker)
    try:
        with torch.inference_mode():
            expected = original(vae, latent, **tiles)
            assert torch.equal(decode_tiled(vae, latent, **tiles), expected)
            spread = lease.notes["sequence_parallel"]["vae"]
            assert spread["gpus"] == [2, 0, 3] and spread["fallback"] is None and spread["decodes"] == 1
            assert spread["tiles"] == sum(spread["tiles_per_gpu"]) and min(spread["tiles_per_gpu"]) > 0
            assert torch.equal(decode(vae, latent), comfy.sd.VAE.decode(vae, latent))    # plain: the host's
            assert lease.notes["sequence_parallel"]["vae"] == {"gpus": [2], "fallback": WHOLE_DECODE, "decodes": 2}
            opted = with_tiled_decode(vae, tile_size=64, overlap=16)                  # XDiTVAELoader's opt-in
            assert lease.notes["sequence_parallel"]["vae"]["decodes"] == 2
            got = decode(opted, latent)
            assert lease.notes["sequence_parallel"]["vae"]["decodes"] == 3      # VAEDecodeTiled's decode, spread
            assert lease.notes["sequence_parallel"]["vae"]["tiles"] > 0
            monkeypatch.undo()
            assert torch.equal(got, nodes.VAEDecodeTiled().decode(vae, {"samples": latent}, 64, 16)[0])
            assert vae is not opted
    finally:
        current_worker.reset(token)
    alone, single = leased([1])                      # a prompt of one GPU: stock, no note
    token = current_worker.set(alone)
    try:
        with torch.inference_mode():
            assert torch.equal(decode_tiled(vae, latent, **tiles), expected) and single.notes == {}
    finally:
        current_worker.reset(token)
    from comfy_multigpu.host import xdit_nodes                 # the loaders: stock inputs (+ the opt-in)
    assert xdit_nodes.XDiTCLIPLoader.INPUT_TYPES() == nodes.CLIPLoader.INPUT_TYPES()
    assert xdit_nodes.XDiTDualCLIPLoader.FUNCTION == nodes.DualCLIPLoader.FUNCTION
    types = xdit_nodes.XDiTVAELoader.INPUT_TYPES()
    assert types["required"] == nodes.VAELoader.INPUT_TYPES()["required"] and "decode_tile_size" in types["optional"]


def test_auto_runs_on_as_many_leased_gpus_as_the_heads_allow_and_a_fixed_count_falls_back(flux):
    """SequenceParallel(auto) holding 8 GPUs with a 6-head model runs on 6 of them (the one-rank output);
    gpus=8 without auto falls back to one GPU and says why. The header's graph carries `auto`."""
    from comfy_multigpu.host.sp_nodes import SequenceParallelWrapper
    from comfy_multigpu.policy.sequence_split import requested_elastic, requested_ranks, with_sequence_parallel
    from comfy_multigpu.runtime.context import current_worker
    args = inputs()
    expected = one_rank(flux, args)

    class Executor:                                 # the wrapper chain's rest: the model's own forward
        class_obj = flux

        def __call__(self, *a, **k):
            return flux._forward(*a, **k)
    worker, lease = leased(list(range(8)))
    token = current_worker.set(worker)
    try:
        for auto, ranks, fallback in ((True, 6, None), (False, 1, "6 attention heads, fewer than 8 GPUs")):
            lease.notes.clear()
            wrapper = SequenceParallelWrapper(8, auto)
            with torch.no_grad():
                got = wrapper(Executor(), args["x"], args["timestep"], args["context"], args["y"], args["guidance"],
                              transformer_options={})
            assert max_rel_error(got, expected) < TOLERANCE
            note = lease.notes["sequence_parallel"]
            assert note["gpus"] == ranks and note["gpu_ids"] == list(range(ranks)) and note.get("auto", False) is auto
            assert (note["fallback"] is None) if fallback is None else (fallback in note["fallback"])
            if auto:
                assert note["forwards"] == 1 and note["exchanges"] > 0
    finally:
        current_worker.reset(token)
    graph = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "f.safetensors", "weight_dtype": "default"}},
             "2": {"class_type": "KSampler", "inputs": {"model": ["1", 0]}}}
    auto = with_sequence_parallel(graph, 4, auto=True)
    assert auto["1.sequence_parallel"]["inputs"] == {"model": ["1", 0], "gpus": 4, "auto": True}
    assert requested_ranks(auto) == 4 and requested_elastic(auto) and not requested_elastic(with_sequence_parallel(graph, 4))


def test_a_vae_that_cannot_be_spread_says_why(vaes):
    import types
    from comfy_multigpu.host.sp_vae import why_one_gpu
    vae, latent, _ = vaes["sd"]
    two = [leased([0, 1])[0].pool.workers[g] for g in (0, 1)]
    assert why_one_gpu(vae, latent, two) is None
    assert "not active" in why_one_gpu(vae, latent, [])
    from comfy_multigpu.runtime.context import current_worker
    alone, _ = leased([1])
    token = current_worker.set(alone)
    try:
        assert "only one GPU leased" in why_one_gpu(vae, latent, [alone])
    finally:
        current_worker.reset(token)
    assert "tiles itself" in why_one_gpu(types.SimpleNamespace(handles_tiling=True, first_stage_model=vae), latent, two)
    assert "1-D (audio)" in why_one_gpu(vae, torch.zeros(1, 4, 16), two)
    on_cpu = [types.SimpleNamespace(gpu_id=0, device=torch.device("cuda", 0))] + two[1:]
    assert "runs on cpu, not on the first leased GPU (cuda:0)" in why_one_gpu(vae, latent, on_cpu)
