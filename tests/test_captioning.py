"""Captioning: the captions contract, the vocabulary, decoding, training through `vpipe fit`, and `vpipe caption`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fit_in
from pipeline.cli import main
from pipeline.models.caption_decoder import CaptionModel
from pipeline.storage.captions import (
    CaptionError,
    Vocabulary,
    check_captions,
    read_captions,
    read_keywords,
    tokenize,
    write_captions,
)
from pipeline.systems.caption_scores import named_motion, nearest_captions, order_accuracy, scores
from pipeline.systems.captioner import Captioner

ROOT = Path(__file__).resolve().parents[1]
KEYWORDS = {"right": ["to the right", "rightwards"], "left": ["to the left", "leftwards"]}


def test_vocabulary_round_trip_from_training_captions_only():
    vocab = Vocabulary.build(["A red disc moves LEFT.", "the red disc, moving left", "a disc"])
    assert vocab.words[:4] == Vocabulary.SPECIALS and vocab.words[4:7] == [
        "disc",
        "a",
        "left",
    ]  # most frequent first
    ids = vocab.encode("The red disc moves left!", max_length=20)
    assert ids[0] == Vocabulary.BOS and ids[-1] == Vocabulary.EOS
    assert vocab.decode(ids) == "the red disc moves left" == " ".join(tokenize("The red disc moves left!"))
    assert vocab.decode(vocab.encode("a blue disc", 20)) == "a <unk> disc"  # unseen word
    assert vocab.decode(vocab.encode("a red disc moves left", 3)) == "a red disc"  # max_length words
    assert vocab.decode([Vocabulary.BOS, 5, Vocabulary.EOS, 6, 7]) == vocab.words[5]  # stops at EOS
    assert Vocabulary(vocab.words).index == vocab.index  # rebuilt from the checkpoint's list
    with pytest.raises(ValueError, match="starts with"):
        Vocabulary(["a", "b"])


def test_captions_file_contract(tmp_path):
    write_captions(
        tmp_path,
        [
            ("v1", "a square moves to the right"),
            ("v1", "a box goes rightwards"),
            ("v2", "a square moves to the left"),
        ],
        KEYWORDS,
    )
    assert read_captions(tmp_path / "captions.csv") == {
        "v1": ["a square moves to the right", "a box goes rightwards"],
        "v2": ["a square moves to the left"],
    }
    assert read_keywords(tmp_path / "caption_keywords.json")["right"] == [
        ("to", "the", "right"),
        ("rightwards",),
    ]
    errors, warnings = check_captions(tmp_path / "captions.csv", {"v1": "right", "v2": "left", "v3": "left"})
    assert errors == [] and warnings == [f"{tmp_path / 'captions.csv'}: 1 video(s) without captions: v3"]
    errors, _ = check_captions(tmp_path / "captions.csv", {"v1": "right"})
    assert errors == [
        f"{tmp_path / 'captions.csv'}: 1 video id(s) not in the manifest: v2",
        f"{tmp_path / 'caption_keywords.json'}: label(s) not in the manifest: left",
    ]
    (tmp_path / "captions.csv").write_text("video_id,caption\nv1,a square\nv2,  \n")
    with pytest.raises(
        CaptionError, match=r"captions.csv: 1 row\(s\) with an empty id or caption, line\(s\) 3"
    ):
        read_captions(tmp_path / "captions.csv")
    (tmp_path / "captions.csv").write_text("video,text\nv1,a\n")
    with pytest.raises(CaptionError, match="missing column"):
        read_captions(tmp_path / "captions.csv")
    with pytest.raises(CaptionError, match="not found"):
        read_captions(tmp_path / "nope.csv")


def test_vpipe_check_reads_the_captions_beside_the_manifest(tiny_dataset, capsys):
    manifest, folder = tiny_dataset, tiny_dataset.parent
    ids = [line.split(",")[0] for line in manifest.read_text().splitlines()[1:]]
    write_captions(folder, [(v, "a square moves") for v in ids] + [("ghost", "a ghost")])
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--manifest", str(manifest)])
    assert exit_.value.code == 1
    assert "1 video id(s) not in the manifest: ghost" in capsys.readouterr().out
    write_captions(folder, [(v, "a square moves") for v in ids])
    main(["check", "--manifest", str(manifest)])
    assert f"{folder / 'captions.csv'}: ok" in capsys.readouterr().out


def test_scores_order_metric_and_nearest_neighbour():
    refs = {
        "a": ["a red square moves to the right", "the red square goes rightwards"],
        "b": ["a blue circle moves to the left", "the blue circle goes leftwards"],
        "c": ["a green cross moves to the left", "a green cross goes leftwards"],
    }
    right = scores(
        refs,
        {
            "a": "a red square moves to the right",
            "b": "a blue circle moves to the left",
            "c": "a green cross goes leftwards",
        },
    )
    wrong = scores(
        refs,
        {"a": "a blue circle moves to the left", "b": "a red square moves to the right", "c": "a red square"},
    )
    assert set(right) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
    assert all(right[k] > wrong[k] for k in right) and right["bleu1"] == pytest.approx(1.0)
    keywords = {k: [tuple(tokenize(p)) for p in v] for k, v in KEYWORDS.items()}
    keywords["clockwise"], keywords["counterclockwise"] = [("clockwise",)], [("counterclockwise",)]
    assert (
        named_motion("It turns counterclockwise", keywords) == "counterclockwise"
    )  # whole words, not substrings
    assert named_motion("a square moves to the right then to the left", keywords) is None  # two motions named
    labels = {"a": "right", "b": "left", "c": "left"}
    assert order_accuracy(
        {"a": "goes rightwards", "b": "moves to the left", "c": "moves to the right"}, labels, keywords
    ) == pytest.approx(2 / 3)
    # Ordered steps tell a clip from its time-reverse; their mean cannot.
    forward = np.arange(12, dtype=np.float32).reshape(1, 4, 3) + 1
    train = np.concatenate([forward, forward[:, ::-1]])
    refs = {"fwd": ["forward"], "rev": ["reversed"]}
    query = forward[:, ::-1] + 0.01
    assert nearest_captions(train, ["fwd", "rev"], refs, query, ["q"]) == {"q": "reversed"}


def _caption_scores(model: CaptionModel, x: torch.Tensor, captions: list[list[int]], max_length: int):
    """Each caption's log-probability for the clip ``x`` ``(1, T, D)`` (teacher forcing from BOS; its EOS
    counted unless it has ``max_length`` words) divided by its length ** 0.7: what beam search ranks by.
    The captions are scored in one batch per length."""
    out = {}
    for length in sorted({len(c) for c in captions}):
        group = [c for c in captions if len(c) == length]
        targets = torch.tensor([c + [Vocabulary.EOS] for c in group])  # (N, length + 1)
        tokens = torch.cat([torch.full((len(group), 1), Vocabulary.BOS), targets[:, :-1]], 1)
        with torch.no_grad():
            logp = model(x.expand(len(group), -1, -1), tokens).log_softmax(-1)
        picked = logp.gather(-1, targets[..., None])[..., 0]  # (N, length + 1)
        total = picked.sum(1) if length < max_length else picked[:, :-1].sum(1)
        out.update({tuple(c): float(t) / max(1, length) ** 0.7 for c, t in zip(group, total, strict=True)})
    return [out[tuple(c)] for c in captions]


@pytest.mark.parametrize("decoder", ["gru", "lstm"])
def test_greedy_and_beam_search_decode_the_models_best_captions(decoder):
    torch.manual_seed(0)
    model = CaptionModel(input_dim=6, vocab_size=12, decoder=decoder, hidden_size=16, embed_dim=8).eval()
    x = torch.randn(5, 4, 6)
    lengths = {}
    for eos_shift in (0.0, 100.0):  # as initialised; then EOS always the likeliest word
        with torch.no_grad():
            model.out.bias[Vocabulary.EOS] += eos_shift
        greedy = model.greedy(x, max_length=7)
        lengths[eos_shift] = sorted(len(w) for w in greedy)
        assert model.beam_search(x, beam_size=1, max_length=7) == greedy
        for i, words in enumerate(greedy):
            # Each word is the argmax after the words before it; the caption ends where EOS is the argmax
            # (EOS itself left out) or at 7 words.
            with torch.no_grad():
                best = model(x[i : i + 1], torch.tensor([[Vocabulary.BOS, *words]]))[0].argmax(-1).tolist()
            assert best[: len(words)] == words and Vocabulary.EOS not in words and len(words) <= 7
            assert len(words) == 7 or best[len(words)] == Vocabulary.EOS
    assert greedy == [[]] * 5  # EOS first: empty captions
    # As initialised, the GRU's captions end early or run to 7 words: both ends of a caption are checked.
    assert lengths[0.0] == ([1, 1, 1, 7, 7] if decoder == "gru" else [7] * 5)

    # A beam as wide as every partial caption (5 words besides EOS, at most 3 words: 1 + 5 + 25 + 125
    # captions) is an exhaustive search: it returns the best of all captions by score / length ** 0.7.
    torch.manual_seed(16)
    small = CaptionModel(input_dim=6, vocab_size=6, decoder=decoder, hidden_size=16, embed_dim=8).eval()
    with torch.no_grad():
        for p in small.parameters():
            p.normal_(0, 0.5)
    words = [w for w in range(6) if w != Vocabulary.EOS]
    every = [[]] + [[a] for a in words]
    every += [[a, b] for a in words for b in words] + [[a, b, c] for a in words for b in words for c in words]
    assert len(every) == 156
    x = x[:3]
    wide = small.beam_search(x, beam_size=150, max_length=3)
    for i in range(len(x)):
        scored = _caption_scores(small, x[i : i + 1], every, 3)
        assert wide[i] == every[max(range(len(every)), key=scored.__getitem__)]
    assert wide != small.greedy(x, max_length=3)  # here the search finds what greedy decoding misses


@pytest.mark.parametrize("encoder", ["gru", "transformer", "meanpool"])
def test_a_tiny_captioner_learns_a_handful_of_clips_exactly(encoder):
    """Six clips, six different captions: teacher forcing alone must bring greedy and beam decoding to them exactly.
    The last two clips are the time-reverses of the first two: only an encoder that reads the order can tell."""
    torch.manual_seed(0)
    captions = [
        "a red square moves to the right",
        "a blue circle shrinks",
        "the cross stays still",
        "a big green disc turns clockwise",
        "a red square moves to the left",
        "a blue circle grows",
    ]
    vocab = Vocabulary.build(captions)
    x = torch.randn(4, 5, 10)
    x = torch.cat([x, x[:2].flip(1)])  # (6, 5, 10)
    tokens = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(vocab.encode(c, 20)) for c in captions], batch_first=True
    )
    model = CaptionModel(10, len(vocab), encoder=encoder, hidden_size=64, embed_dim=32, dropout=0.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        logits = model(x, tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=Vocabulary.PAD
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    greedy = [vocab.decode(ids) for ids in model.greedy(x, 20)]
    beam = [vocab.decode(ids) for ids in model.beam_search(x, 3, 20)]
    if encoder != "meanpool":  # the recurrent encoder and the Transformer's positions both read the order
        assert greedy == captions and beam == captions
    else:  # the mean of a clip equals the mean of its reverse: one caption for both of each pair
        assert greedy[2:4] == captions[2:4] and greedy[0] == greedy[4] and greedy[1] == greedy[5]


@pytest.fixture(scope="module")
def captioner(trained_project, tmp_path_factory):
    """``caption_gru`` fitted for a few epochs on the session's tiny project (squares moving right or left),
    in its own root with MLflow on: a checkpoint, metrics, a samples table and a registered version."""

    root = tmp_path_factory.mktemp("captioner")
    ids = [
        line.split(",")[0]
        for line in (trained_project / "videos" / "manifest.csv").read_text().splitlines()[1:]
    ]
    rows = []
    for v in ids:
        side = "right" if v.startswith("right") else "left"
        rows += [(v, f"a white square moves to the {side}"), (v, f"the square slides {side}wards")]
    write_captions(root, rows, {"right": ["right", "rightwards"], "left": ["left", "leftwards"]})
    fit_in(
        root,
        "-c",
        str(ROOT / "configs/caption_gru.yaml"),
        "--data.init_args.features",
        str(trained_project / "features"),
        "--data.init_args.captions",
        str(root / "captions.csv"),
        "--data.init_args.batch_size",
        "4",
        "--trainer.max_epochs",
        "3",
        "--model.init_args.hidden_size",
        "32",
    )
    return root


@pytest.mark.slow
def test_fit_writes_metrics_samples_and_registers(captioner):
    import mlflow

    metrics = json.loads((captioner / "metrics" / "caption_gru.json").read_text())
    for prefix in ("test", "test/nn_mean", "test/nn_seq"):
        assert {f"{prefix}/{k}" for k in ("bleu1", "bleu4", "rouge_l", "cider", "order")} <= set(metrics)
    samples = (captioner / "plots" / "caption_gru" / "captions.csv").read_text().splitlines()
    assert (
        samples[0] == "video_id,label,generated,nn_mean,nn_seq,references" and len(samples) == 1 + 4
    )  # 4 test clips
    # The metrics are those of the captions in the samples table, rescored here.
    rows = list(csv.DictReader(samples))
    labels = {r["video_id"]: r["label"] for r in rows}
    references = {r["video_id"]: r["references"].split(" | ") for r in rows}
    keywords = read_keywords(captioner / "caption_keywords.json")
    for prefix, column in (("test", "generated"), ("test/nn_mean", "nn_mean"), ("test/nn_seq", "nn_seq")):
        captions = {r["video_id"]: r[column] for r in rows}
        assert metrics[f"{prefix}/order"] == pytest.approx(
            order_accuracy(captions, labels, keywords), abs=1e-5
        )
        assert metrics[f"{prefix}/bleu1"] == pytest.approx(scores(references, captions)["bleu1"], abs=1e-5)
    # Squares moving right or left (a clip and its reverse): the training clip nearest by its ordered
    # steps moves the same way, so its first caption names the test clip's direction.
    assert metrics["test/nn_seq/order"] == 1.0
    client = mlflow.MlflowClient(f"sqlite:///{captioner / 'mlflow.db'}")
    version = client.get_model_version("caption_gru", "1")
    run = client.get_run(version.run_id)
    assert run.data.metrics["test/cider"] == pytest.approx(metrics["test/cider"])
    assert "captions.json" in [a.path for a in client.list_artifacts(version.run_id)]
    checkpoint = torch.load(
        captioner / "models" / "caption_gru" / "best.ckpt", map_location="cpu", weights_only=True
    )
    words = checkpoint["hyper_parameters"]["vocabulary"]
    assert words[:4] == Vocabulary.SPECIALS and "rightwards" in words  # built from the training captions
    recipe = checkpoint["vpipe"]["model"]["init_args"]
    assert (
        recipe["num_classes"] == 2 and recipe["class_weight"] == 1.0
    )  # linked from the data: the class loss is on
    assert checkpoint["state_dict"]["classes.weight"].shape == (
        2,
        32,
    )  # its head: two classes from the summary


@pytest.mark.slow
def test_vpipe_caption_on_a_clip_and_a_still_image(captioner, trained_project, tmp_path, capsys, monkeypatch):
    ckpt = str(captioner / "models" / "caption_gru" / "best.ckpt")
    video = trained_project / "videos" / "right5.mp4"
    image = tmp_path / "still.png"
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(image)
    with pytest.raises(SystemExit) as exit_:
        main(["caption", str(video), str(image), "--ckpt", ckpt, "--json", "--beam", "1"])
    assert exit_.value.code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["video"] for r in lines] == [str(video), str(image)]
    vocabulary = set(
        torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["vocabulary"]
    )
    assert all(r["caption"] and set(r["caption"].split()) <= vocabulary for r in lines)
    # The registered version captions the same file the same way.
    monkeypatch.setenv("VPIPE_ROOT", str(captioner))
    with pytest.raises(SystemExit):
        main(["caption", str(video), "--model", "models:/caption_gru/latest", "--json", "--beam", "1"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == lines[0]


@pytest.mark.slow
def test_vpipe_caption_names_bad_inputs(captioner, trained_project, tmp_path, capsys):
    ckpt = str(captioner / "models" / "caption_gru" / "best.ckpt")
    with pytest.raises(SystemExit, match=r"vpipe caption: .*missing.mp4: no such file"):
        main(["caption", str(tmp_path / "missing.mp4"), "--ckpt", ckpt])
    with pytest.raises(
        SystemExit,
        match=r"gesture_gru/best.ckpt: a checkpoint of pipeline.systems.classifier.Classifier, not of a Captioner",
    ):
        main(
            [
                "caption",
                str(trained_project / "videos" / "right5.mp4"),
                "--ckpt",
                str(trained_project / "models" / "gesture_gru" / "best.ckpt"),
            ]
        )
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 500)
    with pytest.raises(SystemExit) as exit_:
        main(["caption", str(broken), str(trained_project / "videos" / "left5.mp4"), "--ckpt", ckpt])
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert f"vpipe caption: {broken}: not a decodable video" in err and out.startswith(
        str(trained_project / "videos" / "left5.mp4")
    )


# The auxiliary class loss (``class_weight``): the clip's class from the encoder's summary.
CLASS_LOSS_WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "square", "moves", "left", "right"]


def _class_loss_batch():
    tokens = torch.tensor([[1, 4, 5, 6, 7, 2], [1, 4, 5, 6, 8, 2]])
    return {"x": torch.randn(2, 4, 6), "tokens": tokens, "y": torch.tensor([0, 1])}


def test_the_class_loss_is_added_in_training_only_and_trains_the_summary():
    batch = _class_loss_batch()
    torch.manual_seed(0)
    plain = Captioner(input_dim=6, vocabulary=CLASS_LOSS_WORDS, hidden_size=16, embed_dim=8, dropout=0.0)
    torch.manual_seed(0)
    aux = Captioner(
        input_dim=6,
        vocabulary=CLASS_LOSS_WORDS,
        hidden_size=16,
        embed_dim=8,
        dropout=0.0,
        num_classes=2,
        class_weight=0.5,
    )
    assert plain.classes is None and aux.classes.out_features == 2
    words = plain._loss(batch, "train")
    summary = aux.model.encode(batch["x"])[1][1]
    expected = words + 0.5 * torch.nn.functional.cross_entropy(aux.classes(summary), batch["y"])
    torch.testing.assert_close(aux._loss(batch, "train"), expected)  # same weights: words + 0.5 × class
    torch.testing.assert_close(aux._loss(batch, "val"), words)  # val/test losses stay comparable
    aux._loss(batch, "train").backward()
    assert aux.classes.weight.grad.abs().sum() > 0 and aux.model.encoder.weight_ih_l0.grad.abs().sum() > 0


def test_a_class_loss_needs_the_classes():
    with pytest.raises(ValueError, match="class_weight 0.5 needs num_classes"):
        Captioner(input_dim=6, vocabulary=CLASS_LOSS_WORDS, class_weight=0.5)
