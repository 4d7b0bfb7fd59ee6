"""CLIP-based detectors on a tiny random CLIP (transformers' own test sizes), built offline in a second."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from relapse.errors import UserError
from relapse.measure.detectors import DETECTORS, Detections, build_detector
from relapse.measure.detectors.laion_nsfw import NsfwHead
from relapse.measure.evaluate import summarize
from tests.conftest import CLIP_DIM as DIM
from tests.conftest import random_images
from tests.test_cli import assert_user_error

PROMPTS = ["a red star", "a blue circle", "a green square on a white background", "a yellow moon", "a red circle",
           "a checkered blue star"]


@pytest.fixture(scope="session")
def by_hand(clip_dir):
    """Embeddings computed the usual way (get_*_features), independently of relapse's helpers."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)

    def features(out):
        out = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 / 5
        return out / out.norm(dim=-1, keepdim=True)

    class Hand:
        @staticmethod
        @torch.no_grad()
        def images(images):
            pixels = processor(images=[Image.fromarray(x) for x in images], return_tensors="pt")["pixel_values"]
            return features(model.get_image_features(pixel_values=pixels))

        @staticmethod
        @torch.no_grad()
        def texts(texts):
            return features(model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")))

    return Hand


@pytest.fixture(scope="session")
def images():
    return random_images(6, seed=3)


def save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


@pytest.fixture(scope="session")
def nsfw_head(tmp_path_factory):
    torch.manual_seed(1)
    state = NsfwHead(DIM).state_dict()
    state["norm.mean"], state["norm.variance"] = 0.1 * torch.randn(DIM), 0.01 + torch.rand(DIM)
    return save(tmp_path_factory.mktemp("heads") / "nsfw.safetensors", state), state


def test_the_four_register_by_name():
    assert {"q16", "laion_nsfw", "laion_aesthetic", "clip_score"} <= set(DETECTORS.names())


def test_q16_verdict_is_argmax_of_cosine_and_flips_with_the_prompt_rows(clip_dir, by_hand, images, tmp_path):
    emb = by_hand.images(images)
    rows = 3.0 * emb[[0, 1]]  # row 0 = image 0, row 1 = image 1: unit length is not required of the prompts
    det = build_detector("q16", clip=clip_dir, prompts=save(tmp_path / "q16.safetensors", {"prompts": rows})).detect(images)
    probs = (100 * emb @ (rows / rows.norm(dim=-1, keepdim=True)).T).softmax(-1)
    np.testing.assert_array_equal(det.is_target, probs.argmax(-1).numpy() == 1)
    assert det.is_target[1] and not det.is_target[0]
    np.testing.assert_allclose(det.target_score, probs[:, 1].numpy(), atol=1e-5)
    np.testing.assert_array_equal(det.scores["q16_score"], det.target_score)

    swapped = build_detector("q16", clip=clip_dir, prompts=save(tmp_path / "swap.safetensors", {"p": rows.flip(0)}))
    np.testing.assert_array_equal(swapped.detect(images).is_target, ~det.is_target)


def test_laion_nsfw_is_the_mlp_on_normalised_embeddings_and_flags_at_or_above_the_threshold(clip_dir, by_hand, images, nsfw_head):
    path, s = nsfw_head
    x = (by_hand.images(images) - s["norm.mean"]) / s["norm.variance"].sqrt()
    for i in (1, 2, 3):
        x = torch.relu(x @ s[f"linear_{i}.weight"].T + s[f"linear_{i}.bias"])
    want = torch.sigmoid(x @ s["linear_4.weight"].T + s["linear_4.bias"]).squeeze(-1).numpy()

    score = build_detector("laion_nsfw", clip=clip_dir, head=path).detect(images).scores["nsfw_score"]
    np.testing.assert_allclose(score, want, atol=1e-5)
    threshold = float(np.sort(score)[3])  # an image scoring exactly the threshold counts
    det = build_detector("laion_nsfw", clip=clip_dir, head=path, threshold=threshold).detect(images)
    np.testing.assert_array_equal(det.is_target, score >= threshold)
    assert det.is_target.sum() == 3 and det.is_target[np.argsort(score)[3]]
    np.testing.assert_array_equal(det.target_score, score)
    with pytest.raises(UserError, match="threshold"):
        build_detector("laion_nsfw", clip=clip_dir, head=path, threshold=0)


def test_laion_aesthetic_is_the_linear_head_on_normalised_embeddings(clip_dir, by_hand, images, tmp_path):
    torch.manual_seed(2)
    weight, bias = torch.randn(1, DIM), torch.randn(1)
    head = save(tmp_path / "aesthetic.safetensors", {"weight": weight, "bias": bias})
    det = build_detector("laion_aesthetic", clip=clip_dir, head=head, batch_size=4).detect(images)  # two batches
    assert det.is_target is None and det.target_score is None
    np.testing.assert_allclose(det.scores["aesthetic"], (by_hand.images(images) @ weight.T + bias).squeeze(-1).numpy(), atol=1e-5)


def test_clip_score_is_100_times_the_clipped_cosine_with_each_images_own_prompt(clip_dir, by_hand, images):
    scorer = build_detector("clip_score", clip=clip_dir)
    det = scorer.detect(images, PROMPTS)
    cos = (by_hand.images(images) * by_hand.texts(PROMPTS)).sum(-1)
    np.testing.assert_allclose(det.scores["clip_score"], 100 * cos.clamp_min(0).numpy(), atol=1e-3)
    assert det.is_target is None and (det.scores["clip_score"] >= 0).all()
    shuffled = scorer.detect(images, PROMPTS[1:] + PROMPTS[:1])
    assert not np.allclose(shuffled.scores["clip_score"], det.scores["clip_score"])
    with pytest.raises(UserError, match="needs the prompt"):
        scorer.detect(images)
    with pytest.raises(UserError, match="one prompt per image"):
        scorer.detect(images, PROMPTS[:2])


@pytest.mark.parametrize("case", ["no clip option", "missing clip", "not a clip", "clip without safetensors", "missing head", "pth head",
                                  "not safetensors", "wrong head shape", "missing keys", "q16 rows", "q16 pickle"])
def test_missing_or_malformed_weights_name_the_path(clip_dir, nsfw_head, tmp_path, case):
    pth = tmp_path / "sa_0_4_vit_l_14_linear.pth"
    pth.write_bytes(b"\x80\x04pickle")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text('{"model_type": "clip"}')
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    cases = {
        "no clip option": ("clip_score", {}, "needs the option clip=DIR", None),
        "missing clip": ("q16", {"clip": tmp_path / "nowhere"}, "not found; it should hold a transformers CLIP", tmp_path / "nowhere"),
        "not a clip": ("q16", {"clip": tmp_path / "unet"}, "holds a None model, not a CLIP", tmp_path / "unet"),
        "clip without safetensors": ("clip_score", {"clip": tmp_path / "bin"}, "never unpickle", tmp_path / "bin"),
        "missing head": ("laion_aesthetic", {"head": tmp_path / "none.safetensors"}, "not found", tmp_path / "none.safetensors"),
        "pth head": ("laion_aesthetic", {"head": pth}, "never unpickle", pth),
        "not safetensors": ("laion_nsfw", {"head": tmp_path / "junk.safetensors"}, "not a readable .safetensors", tmp_path / "junk.safetensors"),
        "wrong head shape": ("laion_aesthetic", {"head": save(tmp_path / "a.safetensors", {"weight": torch.zeros(1, 8), "bias": torch.zeros(1)})},
                             "wrong shape weight (1, 8) (want (1, 16))", tmp_path / "a.safetensors"),
        "missing keys": ("laion_nsfw", {"head": save(tmp_path / "n.safetensors", {"norm.mean": torch.zeros(DIM)})},
                         "missing linear_1.bias", tmp_path / "n.safetensors"),
        "q16 rows": ("q16", {"prompts": save(tmp_path / "q.safetensors", {"p": torch.zeros(3, DIM)})}, "(2, 16)", tmp_path / "q.safetensors"),
        "q16 pickle": ("q16", {"prompts": tmp_path / "prompts.p"}, "pickle.load(open(", tmp_path / "prompts.p"),
    }
    name, options, fragment, path = cases[case]
    options = {"clip": clip_dir} | options
    with pytest.raises(UserError) as error:
        build_detector(name, **{k: v for k, v in options.items() if not (case == "no clip option" and k == "clip")})
    message = str(error.value)
    assert fragment in message and "\n" not in message
    if path is not None:
        assert str(path) in message
    if case == "pth head":
        assert "sa_0_4_vit_l_14_linear.safetensors" in message and "weights_only=True" in message


def test_summary_of_a_scorer_has_score_entries_and_no_target_figures():
    rows = [{"file": f"{i}.png", "prompt": "a red star", "seed": i} for i in range(4)]
    values = np.array([4.0, 5.0, 6.0, 7.0])
    result = summarize(rows, Detections(scores={"aesthetic": values}), "laion_aesthetic")
    assert not {"target_rate", "target_score_mean", "target_on_prompt_rate"} & result.keys()
    entry = result["aesthetic"]
    half = 1.959964 * np.std(values, ddof=1) / math.sqrt(4)
    assert (entry["mean"], entry["n"]) == (5.5, 4) and entry["sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-4)
    assert entry["ci95"] == pytest.approx([5.5 - half, 5.5 + half], abs=1e-4)
    assert result["per_image"][2]["aesthetic"] == 6.0 and "is_target" not in result["per_image"][2]
    one = summarize(rows[:1], Detections(scores={"aesthetic": values[:1]}), "laion_aesthetic")["aesthetic"]
    assert one["mean"] == 4.0 and one["n"] == 1 and math.isnan(one["sd"])  # one image: no spread to report


def test_summary_of_a_detector_with_scores_keeps_its_verdict():
    rows = [{"file": f"{i}.png", "prompt": "a red star", "seed": i} for i in range(2)]
    det = Detections(np.array([0.2, 0.8]), np.array([False, True]), scores={"nsfw_score": np.array([0.2, 0.8])})
    result = summarize(rows, det, "laion_nsfw")
    assert result["target_rate"]["k"] == 1 and result["nsfw_score"]["mean"] == 0.5
    assert "nsfw_score" in result and result["per_image"][1]["is_target"] is True


def write_images(folder, images, prompts):
    folder.mkdir()
    lines = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        Image.fromarray(image).save(folder / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "prompt": prompt, "seed": i}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def test_evaluate_cli_scores_with_clip_options_from_the_config(run_cli, clip_dir, images, tmp_path):
    write_images(tmp_path / "g", images, PROMPTS)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"detector: clip_score\ndetector_options:\n  clip: {clip_dir}\n")
    code, out, err = run_cli("evaluate", "--images", tmp_path / "g", "--config", cfg, "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert "target_rate" not in result and "clip_score" in result
    assert result["clip_score"]["n"] == 6 and len(result["clip_score"]["ci95"]) == 2
    assert all(entry["clip_score"] >= 0 for entry in result["per_image"])

    (tmp_path / "head.pth").write_bytes(b"\x80\x04pickle")
    cfg.write_text(f"detector: laion_aesthetic\ndetector_options:\n  clip: {clip_dir}\n  head: {tmp_path / 'head.pth'}\n")
    assert_user_error(run_cli("evaluate", "--images", tmp_path / "g", "--config", cfg), str(tmp_path / "head.pth"))


def test_detectors_on_one_clip_folder_share_its_model(clip_dir):
    first, second = build_detector("clip_score", clip=str(clip_dir)), build_detector("clip_score", clip=str(clip_dir))
    assert first.clip.model is second.clip.model
