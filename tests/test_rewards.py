"""Rewards: tiny random models of the real architectures, saved in their released formats and loaded through the
same path as real weights; every score against a hand computation of the published formula on the same model."""

from __future__ import annotations

import io
import json
import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffusion_blend.cli import app
from diffusion_blend.rewards import (
    RewardWeightsError,
    WeightedReward,
    get_reward,
    list_rewards,
    load_user_reward,
    parse_reward,
    parse_weighted,
)
from diffusion_blend.rewards.base import resize_and_crop
from helpers import tiny_rewards

PROMPTS = ["a red cat", "two dogs on a hill", "a blue car"]
runner = CliRunner()


def _images(count=3, size=tiny_rewards.IMAGE, seed=0):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _normalized(images):
    mean = torch.tensor(tiny_rewards.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(tiny_rewards.STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _clip_embeddings(model, tokenizer, images, prompts):
    """CLIP's image and text embeddings by hand: images already at the model's size, so preprocessing is the
    normalisation alone."""
    tokens = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=_normalized(images)).pooler_output
        text = model.get_text_features(**tokens).pooler_output
    return image, text


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_rewards.save_clip_folder(tmp_path_factory.mktemp("clip"))


# -------------------------------------------------------------------------------------------- CLIP family
def test_pickscore_is_logit_scale_times_cosine(clip_folder):
    reward = get_reward("pickscore", clip_folder)
    images = _images()
    model = tiny_rewards.clip_model(tiny_rewards.clip_tokenizer())
    image, text = _clip_embeddings(model, tiny_rewards.clip_tokenizer(), images, PROMPTS)
    expected = model.logit_scale.exp() * _cos(image, text)
    assert torch.allclose(reward(images, PROMPTS), expected, atol=1e-5)


def test_clipscore_is_two_and_a_half_times_the_clipped_cosine_of_the_prefixed_prompt(tmp_path):
    reward = get_reward("clipscore", tiny_rewards.save_clip_folder(tmp_path, flip_image_projection=True))
    images = _images(seed=1)
    model = tiny_rewards.clip_model(tiny_rewards.clip_tokenizer())
    with torch.no_grad():
        model.visual_projection.weight.neg_()
    image, text = _clip_embeddings(
        model, tiny_rewards.clip_tokenizer(), images, [f"A photo depicts {p}" for p in PROMPTS]
    )
    expected = 2.5 * _cos(image, text).clamp(min=0)
    assert (expected > 0).all()  # the clamp does not hide the comparison
    assert torch.allclose(reward(images, PROMPTS), expected, atol=1e-5)


def test_laion_aesthetic_is_the_head_on_the_normalised_embedding(tmp_path):
    folder = tiny_rewards.save_aesthetic_folder(tmp_path / "aesthetic")
    reward = get_reward("aes", folder)
    images = _images(seed=2)
    image, _ = _clip_embeddings(
        tiny_rewards.clip_model(tiny_rewards.clip_tokenizer()), tiny_rewards.clip_tokenizer(), images, PROMPTS
    )
    with torch.no_grad():
        expected = tiny_rewards.aesthetic_head()(image / image.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(reward(images, PROMPTS), expected, atol=1e-5)


def test_hpsv2_open_clip_checkpoint_scores_the_cosine(tmp_path):
    folder, model = tiny_rewards.save_hps_folder(tmp_path / "hps")
    reward = get_reward("hps", folder)  # alias of hpsv2.1
    images = _images(seed=3)
    tokenizer = tiny_rewards.clip_tokenizer(eos_last=True)
    image, text = _clip_embeddings(model, tokenizer, images, PROMPTS)
    assert reward.name == "hpsv2.1"
    assert torch.allclose(reward(images, PROMPTS), _cos(image, text), atol=1e-5)


def test_hpsv2_pools_text_at_the_end_of_text_token_like_open_clip(tmp_path):
    """open_clip reads the text at argmax(token ids): the padded and the unpadded prompt give the same score."""
    folder, _ = tiny_rewards.save_hps_folder(tmp_path / "hps")
    reward = get_reward("hpsv2.1", folder)
    features = reward.tower.text_features(["a cat", "a cat"])
    tokens = reward.tower.tokenizer(["a cat"], return_tensors="pt")
    unpadded = reward.tower.model.get_text_features(**tokens).pooler_output
    assert torch.allclose(features[0], unpadded[0], atol=1e-6)


def test_image_reward_is_the_normalised_mlp_on_the_cross_attended_cls(tmp_path):
    folder, (vision, text, head, tokenizer) = tiny_rewards.save_image_reward_folder(tmp_path / "ir")
    reward = get_reward("ir", folder)
    images = _images(seed=4)
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_embeds = vision(pixel_values=_normalized(images)).last_hidden_state
        cls = text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
        ).last_hidden_state[:, 0]
        expected = (head(cls).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    assert torch.allclose(reward(images, PROMPTS), expected, atol=1e-5)


# ------------------------------------------------------------------------------------ shared behaviour
@pytest.fixture(scope="module")
def every_reward(clip_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    return {
        "pickscore": get_reward("pickscore", clip_folder),
        "clipscore": get_reward("clipscore", clip_folder),
        "aesthetic": get_reward("aesthetic", tiny_rewards.save_aesthetic_folder(root / "aes")),
        "hpsv2.1": get_reward("hpsv2.1", tiny_rewards.save_hps_folder(root / "hps")[0]),
        "imagereward": get_reward("imagereward", tiny_rewards.save_image_reward_folder(root / "ir")[0]),
        "jpeg": get_reward("jpeg"),
    }


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "aesthetic", "hpsv2.1", "imagereward", "jpeg"])
def test_a_batch_scores_like_its_images_one_by_one(every_reward, name):
    reward, images = every_reward[name], _images(seed=5)
    batch = reward(images, PROMPTS)
    single = torch.stack([reward(images[i : i + 1], PROMPTS[i : i + 1])[0] for i in range(3)])
    assert batch.shape == (3,) and torch.allclose(batch, single, atol=1e-5)
    assert torch.equal(reward(images, PROMPTS), batch)  # deterministic


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "aesthetic", "hpsv2.1", "imagereward"])
def test_gradients_reach_the_pixels(every_reward, name):
    reward = every_reward[name]
    images = _images(count=2, size=48, seed=6).requires_grad_(True)  # 48 px: the resize is part of the graph
    scores = reward(images, PROMPTS[:2])
    scores.sum().backward()
    assert reward.differentiable and images.grad is not None and torch.isfinite(images.grad).all()
    clipped = name == "clipscore" and bool((scores == 0).all())  # max(cos, 0) has no slope below 0
    assert clipped or images.grad.abs().sum() > 0


def test_no_graph_without_grad_inputs(every_reward):
    assert not every_reward["pickscore"](_images(), PROMPTS).requires_grad


def test_jpeg_equals_the_jpeg_size_computed_directly():
    images = _images(count=2, size=40, seed=7)
    expected = []
    for image in images:
        array = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        expected.append(-len(buffer.getvalue()) / 1000)
    assert get_reward("compressibility")(images, ["", ""]).tolist() == pytest.approx(expected, rel=1e-7)
    assert not get_reward("jpeg").differentiable


def test_torch_preprocessing_matches_pil_resize_and_crop():
    """Our differentiable resize (bicubic, antialiased) against PIL's bicubic resize + centre crop."""
    image = _images(count=1, size=96, seed=8)[0]
    ours = resize_and_crop(image[None], 32, (32, 32))[0]
    pil = Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).resize(
        (32, 32), Image.BICUBIC
    )
    reference = torch.from_numpy(np.asarray(pil)).permute(2, 0, 1).float() / 255
    assert (ours - reference).abs().mean() < 0.01


# -------------------------------------------------------------------------------------- registry, errors
def test_every_registered_reward_has_a_description():
    rewards = list_rewards()
    assert {"imagereward", "pickscore", "hpsv2", "hpsv2.1", "aesthetic", "clipscore", "jpeg"} <= set(rewards)
    assert all(info.measures and info.weights and info.licence for info in rewards.values())


def test_unknown_reward_raises():
    with pytest.raises(ValueError, match="unknown reward 'vila'"):
        get_reward("vila")


def test_offline_error_names_the_files_and_where_to_put_them(monkeypatch):
    monkeypatch.delenv("DIFFUSION_BLEND_PICKSCORE", raising=False)
    with pytest.raises(RewardWeightsError) as caught:
        get_reward("pickscore")
    message = str(caught.value)
    assert "\n" not in message
    assert "yuvalkirstain/PickScore_v1" in message and "path_or_id=FOLDER" in message
    assert "$DIFFUSION_BLEND_PICKSCORE" in message


def test_environment_variable_points_to_the_weights(monkeypatch, clip_folder):
    monkeypatch.setenv("DIFFUSION_BLEND_CLIPSCORE", str(clip_folder))
    assert get_reward("clipscore")(_images(), PROMPTS).shape == (3,)


def test_folder_without_the_files_says_what_is_missing(tmp_path):
    with pytest.raises(RewardWeightsError, match="Needs ImageReward.pt, med_config.json"):
        get_reward("imagereward", tmp_path)


def test_weighted_spec_parses():
    assert parse_weighted("ir=0.5, aes=0.25,jpeg") == {"ir": 0.5, "aes": 0.25, "jpeg": 1.0}
    for bad, message in (
        ("ir=x", "not a number"),
        ("ir=1,ir=2", "given twice"),
        ("ir=nan", "finite"),
        ("ir,,aes", "empty"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_weighted(bad)


def test_weighted_sum_equals_the_sum_of_its_parts(every_reward):
    images = _images(seed=9)
    mix = WeightedReward(
        {"jpeg": every_reward["jpeg"], "pickscore": every_reward["pickscore"]}, {"jpeg": 0.3, "pickscore": -2.0}
    )
    expected = 0.3 * every_reward["jpeg"](images, PROMPTS) - 2.0 * every_reward["pickscore"](images, PROMPTS)
    assert torch.allclose(mix(images, PROMPTS), expected, atol=1e-5)
    assert not mix.differentiable  # jpeg is not


def test_user_reward_by_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent("""
        import torch

        def brightness(images, prompts):
            return images.mean(dim=(1, 2, 3))
        brightness.differentiable = True
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = parse_reward("my_rewards:brightness=2,jpeg=1")
    images = _images(seed=10)
    expected = 2 * images.mean(dim=(1, 2, 3)) + get_reward("jpeg")(images, PROMPTS)
    assert torch.allclose(reward(images, PROMPTS), expected, atol=1e-6)
    assert load_user_reward("my_rewards:brightness").differentiable
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize(
    "spec, message", [("nope_module_xyz:f", "cannot import"), ("math:nothing", "has no"), ("math:pi", "not callable")]
)
def test_bad_user_rewards_raise(spec, message):
    with pytest.raises(ValueError, match=message):
        load_user_reward(spec)


def test_bad_images_raise(every_reward):
    reward = every_reward["jpeg"]
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(torch.rand(3, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        reward(_images() * 255, PROMPTS)
    with pytest.raises(ValueError, match="one prompt"):
        reward(_images(), PROMPTS[:2])


def test_lab_rewards_register_and_differentiate():
    reward = get_reward("lab:r2")
    samples = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], requires_grad=True)
    values = reward(samples, None)
    values.sum().backward()
    assert values.tolist() == [2.0, 0.5] and samples.grad.tolist() == [[0.0, 1.0], [0.0, 1.0]]


# --------------------------------------------------------------------------------------------------- CLI
def test_rewards_list_prints_every_reward():
    result = runner.invoke(app, ["rewards", "list"])
    assert result.exit_code == 0
    for name in ("imagereward", "pickscore", "hpsv2.1", "aesthetic", "clipscore", "jpeg"):
        assert name in result.stdout


def test_score_command_json(tmp_path, clip_folder):
    paths = []
    for index, image in enumerate(_images(count=2, size=40, seed=11)):
        path = tmp_path / f"{index}.png"
        Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    result = runner.invoke(
        app,
        [
            "score",
            "--reward",
            "pickscore",
            "--weights-path",
            str(clip_folder),
            "--prompt",
            "a red cat",
            "--json",
            *map(str, paths),
        ],
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    loaded = torch.stack([torch.from_numpy(np.asarray(Image.open(p))).permute(2, 0, 1).float() / 255 for p in paths])
    expected = get_reward("pickscore", clip_folder)(loaded, ["a red cat"] * 2)
    assert [row["image"] for row in scores] == [str(p) for p in paths]
    assert all(math.isclose(row["score"], float(e), rel_tol=1e-5) for row, e in zip(scores, expected))


def test_score_command_offline_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSION_BLEND_IMAGEREWARD", raising=False)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    result = runner.invoke(app, ["score", "--reward", "ir", "--prompt", "a cat", str(image)])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "DIFFUSION_BLEND_IMAGEREWARD" in lines[0]


# ------------------------------------------------------------------------------------- modes and edge cases
def test_train_mode_is_ignored(tmp_path):
    folder, _ = tiny_rewards.save_image_reward_folder(tmp_path / "ir")
    reward = get_reward("ir", folder)
    images = _images(seed=12)
    before = reward(images, PROMPTS)
    holder = torch.nn.ModuleList([reward]).train()  # e.g. a trainer switching everything to train mode
    assert not reward.training and not any(module.training for module in holder[0].modules())
    assert torch.equal(reward(images, PROMPTS), before)


def test_half_precision_rewards_score_float_images(clip_folder):
    images = _images(seed=13)
    full = get_reward("pickscore", clip_folder)(images, PROMPTS)
    half = get_reward("pickscore", clip_folder, dtype=torch.bfloat16)(images, PROMPTS)
    assert torch.allclose(half.float(), full, rtol=0.05, atol=0.05)


def test_hpsv2_letterboxes_non_square_images_like_open_clip(tmp_path):
    folder, model = tiny_rewards.save_hps_folder(tmp_path / "hps")
    reward = get_reward("hpsv2.1", folder)
    images = _images(count=2, size=32, seed=14)[..., :, :16]  # 32 high, 16 wide: pad 8 black columns each side
    padded = torch.nn.functional.pad(images, (8, 8, 0, 0), value=0.0)
    image, text = _clip_embeddings(model, tiny_rewards.clip_tokenizer(eos_last=True), padded, PROMPTS[:2])
    assert torch.allclose(reward(images, PROMPTS[:2]), _cos(image, text), atol=1e-5)


def test_a_missing_local_path_raises_instead_of_downloading(tmp_path):
    with pytest.raises(RewardWeightsError, match="does not exist"):
        get_reward("imagereward", tmp_path / "typo")


def test_a_hub_id_is_tried_as_a_hub_repository():
    with pytest.raises(RewardWeightsError, match="someone/my-image-reward"):
        get_reward("imagereward", "someone/my-image-reward")


def test_aesthetic_head_alone_takes_clip_from_the_hub(tmp_path):
    torch.save(
        {f"layers.{k}": v for k, v in tiny_rewards.aesthetic_head().state_dict().items()},
        tmp_path / "sac+logos+ava1-l14-linearMSE.pth",
    )
    with pytest.raises(RewardWeightsError, match="openai/clip-vit-large-patch14"):
        get_reward("aesthetic", tmp_path)


def test_non_finite_images_raise(every_reward):
    images = _images()
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        every_reward["jpeg"](images, PROMPTS)


# ---------------------------------------------------------------------- independent references (no transformers)
def _perturb_norms(state, seed=0):
    """Random layer-norm parameters, so a wrong epsilon or a swapped norm shows in the scores."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.3 * torch.randn(v.shape, generator=generator) if "norm" in k.lower() or "ln_" in k else v
        for k, v in state.items()
    }


def test_image_reward_matches_a_functional_blip_reference(tmp_path):
    from helpers import reference_rewards

    folder, (_, _, _, tokenizer) = tiny_rewards.save_image_reward_folder(tmp_path / "ir")
    state = _perturb_norms(torch.load(folder / "ImageReward.pt"))
    torch.save(state, folder / "ImageReward.pt")
    images = _images(seed=15)
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        expected = reference_rewards.blip_image_reward(
            state, tokens.input_ids, tokens.attention_mask, _normalized(images), vision_heads=2, text_heads=2
        )
    assert torch.allclose(get_reward("ir", folder)(images, PROMPTS), expected, atol=1e-5)


def test_hpsv2_matches_an_open_clip_style_reference(tmp_path):
    from helpers import reference_rewards

    tokenizer = tiny_rewards.clip_tokenizer(eos_last=True)
    torch.manual_seed(16)
    reference = reference_rewards.OpenClipReference(len(tokenizer)).eval()
    reference.load_state_dict(_perturb_norms(reference.state_dict()))
    folder = tmp_path / "hps"
    folder.mkdir()
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}  # DDP-saved keys
    torch.save(checkpoint, folder / "HPS_v2_compressed.pt")
    (folder / "open_clip_config.json").write_text(json.dumps({"vision_heads": 3, "text_heads": 2}))
    tokenizer.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    images = _images(seed=17)
    ids = torch.zeros(3, 16, dtype=torch.long)  # open_clip's tokenisation: zero padding to the context length
    for row, prompt in enumerate(PROMPTS):
        tokens = tokenizer(prompt).input_ids
        ids[row, : len(tokens)] = torch.tensor(tokens)
    with torch.no_grad():
        expected = reference.score(_normalized(images), ids)
    assert torch.allclose(get_reward("hpsv2", folder)(images, PROMPTS), expected, atol=1e-5)


def test_score_command_takes_a_path_per_reward_of_a_sum(tmp_path, clip_folder):
    image = tmp_path / "x.png"
    Image.fromarray(
        (_images(count=1, size=32, seed=18)[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    ).save(image)
    result = runner.invoke(
        app,
        [
            "score",
            "--reward",
            "pickscore=1,jpeg=0.1",
            "--weights-path",
            f"pickscore={clip_folder}",
            "--batch-size",
            "1",
            "--json",
            "--prompt",
            "a cat",
            str(image),
            str(image),
        ],
    )
    assert result.exit_code == 0, result.output
    first, second = json.loads(result.stdout)
    assert first["score"] == second["score"]
    bad = runner.invoke(
        app,
        [
            "score",
            "--reward",
            "pickscore=1,jpeg=0.1",
            "--weights-path",
            str(clip_folder),
            "--prompt",
            "a cat",
            str(image),
        ],
    )
    assert bad.exit_code != 0 and "NAME=PATH" in bad.stderr
