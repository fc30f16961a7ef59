"""The demo shapes world, its word-level tokenizer and its LLaVA processor (CPU, no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from specvlm.demo import ShapesWorld, build_processor, build_tokenizer, format_example, prompt
from specvlm.demo.text import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, UNK_ID, vocabulary
from specvlm.demo.world import (
    BACKGROUNDS,
    DIRECTIONS,
    IMAGE_QUESTION,
    IMAGE_SIZE,
    VIDEO_QUESTION,
    Motion,
    Scene,
    Shape,
    VideoScene,
    caption,
    questions,
    render,
    render_video,
    video_caption,
    words,
)

N = 200


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def proc():
    return build_processor(image_size=64, patch_size=8)


def _texts(seed: int = 0) -> list[str]:
    """N captions, N video captions and N qa questions + answers from one world."""
    w = ShapesWorld(seed)
    out = [w.image_scene()[1] for _ in range(N)]
    out += [w.video_scene(frames=2)[1] for _ in range(N)]
    for _ in range(N):
        _, q, a = w.qa_scene()
        out += [q, a]
    return out


def _bbox(img, background: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the pixels that differ from the background."""
    arr = np.asarray(img).astype(int)
    ys, xs = np.nonzero(np.abs(arr - np.array(BACKGROUNDS[background])).sum(-1) > 30)
    return xs.min(), ys.min(), xs.max(), ys.max()


# ---------------------------------------------------------------- world


def test_same_seed_same_samples():
    a, b, c = ShapesWorld(7), ShapesWorld(7), ShapesWorld(8)
    for _ in range(10):
        sa, sb = a.sample(p_video=0.3, frames=3), b.sample(p_video=0.3, frames=3)
        assert sa.keys() == sb.keys() and sa["prompt"] == sb["prompt"] and sa["response"] == sb["response"]
        images_a = sa.get("frames", [sa.get("image")])
        images_b = sb.get("frames", [sb.get("image")])
        assert [im.tobytes() for im in images_a] == [im.tobytes() for im in images_b]
    assert [a.image_scene()[1] for _ in range(5)] != [c.image_scene()[1] for _ in range(5)]


def test_sample_kinds_and_keys():
    w = ShapesWorld(1)
    kinds = set()
    for _ in range(60):
        s = w.sample(frames=3)
        kinds.add(s["kind"])
        if s["kind"] == "video":
            assert s["prompt"] == VIDEO_QUESTION and len(s["frames"]) == 3 and "image" not in s
        else:
            assert s["image"].size == (IMAGE_SIZE, IMAGE_SIZE) and s["image"].mode == "RGB" and "frames" not in s
            if s["kind"] == "caption":
                assert s["prompt"] == IMAGE_QUESTION
    assert kinds == {"caption", "qa", "video"}


def test_captions_short_and_in_vocab(tok):
    vocab = vocabulary()
    for text in _texts():
        assert all(w in vocab for w in words(text)), text
        assert UNK_ID not in tok(text, add_special_tokens=False).input_ids, text
        assert len(text.split()) < 40


def test_caption_is_function_of_image():
    w = ShapesWorld(2)
    by_image: dict[bytes, str] = {}
    by_caption: dict[str, bytes] = {}
    for _ in range(N):
        scene = w.random_scene()
        image, text = render(scene).tobytes(), caption(scene)
        assert render(scene).tobytes() == image  # rendering is deterministic
        assert by_image.setdefault(image, text) == text  # same image -> same caption
        assert by_caption.setdefault(text, image) == image  # and the caption pins the image down
    expected = "a large red circle at the top left and a small blue square in the center on a gray background"
    assert caption(Scene("gray", (Shape("circle", "red", "large", 0), Shape("square", "blue", "small", 4)))) == expected
    with pytest.raises(ValueError, match="reading order"):  # shapes must be listed in reading order
        Scene("gray", (Shape("square", "blue", "small", 4), Shape("circle", "red", "large", 0)))
    with pytest.raises(ValueError, match="distinct cells"):
        Scene("gray", (Shape("square", "blue", "small", 4), Shape("circle", "red", "large", 4)))


def test_render_places_shapes_in_their_cells():
    for cell in range(9):
        img = render(Scene("black", (Shape("square", "white", "large", cell),)))
        left, top, right, bottom = _bbox(img, "black")
        row, col = divmod(cell, 3)
        assert abs((left + right) / 2 - (col + 0.5) * 64 / 3) < 1.5
        assert abs((top + bottom) / 2 - (row + 0.5) * 64 / 3) < 1.5


def test_qa_answers_on_constructed_scenes():
    scene = Scene(
        "black",
        (
            Shape("circle", "red", "large", 0),
            Shape("square", "blue", "small", 2),
            Shape("square", "green", "large", 4),
        ),
    )
    qa = questions(scene)
    assert qa["count"] == [("how many shapes are there?", "three")]
    assert qa["color"] == [("what color is the circle?", "red")]  # two squares: never asked
    assert ("where is the blue square?", "at the top right") in qa["where"]
    assert ("what size is the green square?", "large") in qa["size"]
    assert ("what shape is in the center?", "square") in qa["shape"]
    assert qa["describe"] == [(IMAGE_QUESTION, caption(scene))]
    one = Scene("gray", (Shape("star", "yellow", "small", 8),))
    assert questions(one)["count"][0][1] == "one"
    assert questions(one)["where"] == [("where is the yellow star?", "at the bottom right")]
    twins = Scene("gray", (Shape("star", "red", "small", 0), Shape("star", "red", "large", 1)))
    assert questions(twins)["where"] == [] and questions(twins)["color"] == []


def test_qa_scene_answers_are_consistent():
    w = ShapesWorld(4)
    for _ in range(N):
        _, q, a = w.qa_scene()
        if q.startswith("how many"):
            assert a in ("one", "two", "three", "four")
        elif q.startswith("what color"):
            assert a in ("red", "green", "blue", "yellow", "purple", "orange", "white")
        elif q == IMAGE_QUESTION:
            assert a.endswith("background")


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
def test_video_shape_moves_in_stated_direction(direction):
    d_row, d_col = DIRECTIONS[direction]
    start = {(0, 1): 3, (0, -1): 5, (1, 0): 1, (-1, 0): 7}[(d_row, d_col)]
    video = VideoScene("gray", (Motion(Shape("circle", "red", "large", start), direction),))
    assert video_caption(video) == f"a large red circle moves from {direction} on a gray background"
    frames = render_video(video, frames=6)
    centers = [np.array(_bbox(f, "gray")).reshape(2, 2).mean(0) for f in frames]  # (x, y)
    steps = np.diff(np.array(centers), axis=0)  # [frames - 1, 2]
    assert (steps[:, 0] * d_col >= 1).all() if d_col else (np.abs(steps[:, 0]) < 1).all()
    assert (steps[:, 1] * d_row >= 1).all() if d_row else (np.abs(steps[:, 1]) < 1).all()


def test_world_videos_match_captions():
    w = ShapesWorld(5)
    for _ in range(20):
        video = w.random_video()
        frames, text = render_video(video, frames=4), video_caption(video)
        assert len(frames) == 4 and frames[0].tobytes() != frames[-1].tobytes()
        assert text.count(" moves from ") == len(video.motions)
        if len(video.motions) == 1:
            direction = video.motions[0].direction
            assert f"moves from {direction} on" in text
            (x0, y0), (x1, y1) = (np.array(_bbox(f, video.background)).reshape(2, 2).mean(0) for f in frames[::3])
            d_row, d_col = DIRECTIONS[direction]
            assert np.sign(round(x1 - x0)) == d_col and np.sign(round(y1 - y0)) == d_row
    frames, text = ShapesWorld(5).video_scene(frames=8)
    assert len(frames) == 8 and " moves from " in text


# ---------------------------------------------------------------- tokenizer and processor


def test_special_token_ids(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID == 3
    assert tok.unk_token_id == UNK_ID and tok.padding_side == "left"
    assert len(tok) == len(vocabulary())


def test_decode_round_trips_captions_and_questions(tok):
    for text in _texts(seed=6)[::7]:
        ids = tok(text).input_ids
        assert ids[0] == BOS_ID
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("describe the image.").input_ids, skip_special_tokens=True) == "describe the image."


def test_format_example_splits_at_a_token_boundary(tok):
    p, r = format_example("what color is the circle?", "red")
    assert p == prompt("what color is the circle?") and r.endswith("</s>")
    full = tok(p + r).input_ids
    assert full == tok(p).input_ids + tok(r, add_special_tokens=False).input_ids
    assert full[-2:] == [tok.convert_tokens_to_ids("red"), EOS_ID]


def test_processor_image_tokens_and_left_padding(proc):
    w = ShapesWorld(9)
    img, _ = w.image_scene()
    enc = proc(text=[prompt(IMAGE_QUESTION)], images=[img], return_tensors="pt")
    assert int((enc["input_ids"] == IMAGE_ID).sum()) == 64
    assert tuple(enc["pixel_values"].shape) == (1, 3, 64, 64)
    texts = [prompt(IMAGE_QUESTION), prompt("how many shapes are there?")]
    enc = proc(text=texts, images=[img, w.image_scene()[0]], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]  # [2, T]
    assert ((ids == IMAGE_ID).sum(1) == 64).all()
    assert ids[0, 0] == PAD_ID and mask[0, 0] == 0 and (mask[:, -1] == 1).all() and mask[1].all()
    assert ids[0, mask[0].argmax()] == BOS_ID
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": IMAGE_QUESTION}]}]
    assert proc.apply_chat_template(chat, add_generation_prompt=True) == prompt(IMAGE_QUESTION)


def test_processor_save_load_round_trip(proc, tmp_path):
    img, text = ShapesWorld(10).image_scene()
    proc.save_pretrained(tmp_path)
    loaded = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, transformers.LlavaProcessor)
    a = proc(text=[prompt(IMAGE_QUESTION)], images=[img], return_tensors="pt")
    b = loaded(text=[prompt(IMAGE_QUESTION)], images=[img], return_tensors="pt")
    assert (a["input_ids"] == b["input_ids"]).all()
    assert np.allclose(a["pixel_values"].numpy(), b["pixel_values"].numpy())
    t = loaded.tokenizer
    assert t.padding_side == "left" and t.decode(t(text).input_ids, skip_special_tokens=True) == text


def test_build_processor_rejects_bad_patch():
    with pytest.raises(ValueError, match="multiple"):
        build_processor(image_size=64, patch_size=7)
