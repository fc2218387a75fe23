"""Views of the tiny checkpoint with the pinned ComfyUI's real classes, in a fresh interpreter.

python weights_probe.py COMFYUI_DIR CHECKPOINT -> one JSON object: how much views share, what an
in-place update through comfy.utils.copy_to_param does to the others (patched and not), and whether
an offload of a view whose weights had been copied elsewhere (what a device load does) points back
at the shared CPU tensors. The device copies are made on the CPU: no CUDA device here.
"""
import json
import os
import sys


def main(comfyui_dir: str, checkpoint: str) -> dict:
    sys.path.insert(0, comfyui_dir)
    sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    os.chdir(comfyui_dir)
    sys.argv = ["main.py", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils
    from comfy_multigpu.host import patching
    from comfy_multigpu.runtime import weight_views, weights
    from comfy_multigpu.runtime.pool import WorkerPool

    out = {}
    template = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True,
                                                     embedding_directory=[])
    a, b = weight_views.make_view(template), weight_views.make_view(template)
    t_params = dict(template[0].model.named_parameters())
    a_params, b_params = dict(a[0].model.named_parameters()), dict(b[0].model.named_parameters())
    out["params"] = len(t_params)
    out["shared_storage"] = sum(a_params[k].data_ptr() == t_params[k].data_ptr() == b_params[k].data_ptr()
                                for k in t_params)
    out["own_objects"] = sum(a_params[k] is not t_params[k] and a_params[k] is not b_params[k] for k in t_params)
    out["own_modules"] = (a[0].model is not b[0].model and a[1].cond_stage_model is not b[1].cond_stage_model
                          and a[2].first_stage_model is not b[2].first_stage_model)
    out["patcher_points_at_own_module"] = (a[0].model is not template[0].model
                                           and a[1].patcher.model is a[1].cond_stage_model
                                           and a[2].patcher.model is a[2].first_stage_model)
    key = next(k for k in t_params if k.endswith("proj_in.weight"))
    before = t_params[key].detach().clone()

    # ComfyUI's own in-place update, unpatched: it writes into the storage every view shares
    pool = WorkerPool([(torch.device("cpu"), "cpu")] * 2)
    pool.weights = weights.WeightStore(1 << 40)
    pool.weights._shared_ptrs.update({p: "t" for p in weight_views.shared_storages(template)})
    host, specs = patching.load_manifest()
    wanted = {"weights-copy-on-write", "weights-offload-unpatch"}
    patchset = patching.PatchSet([s for s in specs if s.id in wanted], pool)
    comfy.utils.copy_to_param(a[0].model, "diffusion_model." + key.split("diffusion_model.", 1)[1],
                              torch.full_like(before, 7.0))
    out["unpatched_inplace_reaches_other_view"] = bool(torch.equal(b_params[key].detach(),
                                                                   torch.full_like(before, 7.0)))
    t_params[key].data.copy_(before)              # put the template back for the next part
    originals = (comfy.utils.copy_to_param, comfy.model_patcher.ModelPatcher.unpatch_model)
    patchset.apply()
    out["applied"] = comfy.utils.copy_to_param is not originals[0]
    try:
        comfy.utils.copy_to_param(a[0].model, "diffusion_model." + key.split("diffusion_model.", 1)[1],
                                  torch.full_like(before, 5.0))
        out["cow_writer_sees_update"] = bool(torch.equal(a_params[key].detach(), torch.full_like(before, 5.0)))
        out["cow_other_view_unchanged"] = bool(torch.equal(b_params[key].detach(), before))
        out["cow_template_unchanged"] = bool(torch.equal(t_params[key].detach(), before))
        out["cow_writer_has_own_storage"] = a_params[key].data_ptr() != t_params[key].data_ptr()

        # a "device load" of view b: every tensor gets its own copy, as model.to(cuda) would give it
        for p in b[0].model.parameters():
            p.data = p.data.clone()
        out["device_copies_before_offload"] = sum(b_params[k].data_ptr() != t_params[k].data_ptr() for k in t_params)
        b[0].unpatch_model(device_to=torch.device("cpu"))
        out["private_after_offload"] = sum(b_params[k].data_ptr() != t_params[k].data_ptr() for k in t_params)
    finally:
        patchset.revert()
    out["reverted"] = (comfy.utils.copy_to_param, comfy.model_patcher.ModelPatcher.unpatch_model) == originals
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
