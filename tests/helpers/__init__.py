"""Helpers shared by the test suite: a real-ComfyUI launcher/client and workflow builders."""
