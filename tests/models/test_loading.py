import pytest

from relapse.errors import UserError
from relapse.models.loading import load_pipeline, resolve_model


def test_local_pipeline_folder_loads_with_safety_checker_off(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    assert pipe.safety_checker is None and pipe.unet.config.sample_size == 8


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(tmp_path / "nowhere")


def test_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        resolve_model(tmp_path)


def test_offline_hub_id_gives_one_clear_line():
    with pytest.raises(UserError, match="not in the Hugging Face cache") as info:
        load_pipeline("CompVis/stable-diffusion-v1-4", device="cpu")
    assert "\n" not in str(info.value)
