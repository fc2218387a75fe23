"""Test fixture: makes the host's shape differ from what comfy-multigpu was written for.

It wraps folder_paths.get_save_image_path with an extra parameter (still working for SaveImage),
so the extension's signature guard must refuse and ComfyUI must run stock.
"""
import folder_paths

_original = folder_paths.get_save_image_path


def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0, counter_start=1):
    return _original(filename_prefix, output_dir, image_width, image_height)


folder_paths.get_save_image_path = get_save_image_path
