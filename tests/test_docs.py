"""The docs' commands are the real ones: every `vpipe` command line in a fenced bash block of README.md
and docs/*.md names a subcommand that exists and only options that subcommand has (values are not
checked: NAME, FILE, ... placeholders are fine). Relative links point at files and headings that exist."""

import argparse
import re
import shlex
from pathlib import Path

from pipeline.options import DEBUG, TRAINING
from pipeline.options import build_parser as _parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# `vpipe fit|validate|test|predict` are LightningCLI (pipeline/train.py): options are dotted and open-ended.
TRAINING_OPTIONS = {
    "-h",
    "--help",
    "-c",
    "--config",
    "--name",
    "--seed_everything",
    "--print_config",
    "--ckpt_path",
    "--weights_only",
    "--optimizer",
    "--lr_scheduler",
    # pipeline/train.py's VPipeCLI.add_arguments_to_parser
    "--monitor",
    "--monitor_mode",
    "--export_backbone",
    "--system_metrics",
    "--predict_split",
}
TRAINING_SPECIFIC = {"validate": {"--verbose"}, "test": {"--verbose"}, "predict": {"--return_predictions"}}
TRAINING_PREFIXES = ("--trainer.", "--model.", "--data.", "--optimizer.", "--lr_scheduler.")


def _subcommands() -> dict[str, set[str] | None]:
    """Each subcommand's option strings from the real parser (None: LightningCLI's, checked apart)."""
    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {
        name: None if name in TRAINING else set(p._option_string_actions) for name, p in sub.choices.items()
    }


SUBCOMMANDS = _subcommands()


def bash_blocks(path: Path):
    """(line number, joined command line) of every line of a fenced ```bash block, continuations joined."""
    fence = None
    pending, start = "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence = stripped[3:].strip()
            continue
        if stripped.startswith("```"):
            fence = None
            continue
        if fence != "bash":
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        yield start, pending + stripped
        pending = ""


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in a line that is not a vpipe command
        return text.split("#")[0].split()


def _commands(words: list[str]):
    """Simple commands of a shell line (split at ; && || | &), quoted command strings included
    (`ssh HOST "... vpipe extract ..."`, `sbatch --wrap "vpipe merge ..."`)."""
    current: list[str] = []
    for word in words:
        if word in (";", "&&", "||", "|", "&") or word.endswith(";"):
            if word.endswith(";") and word != ";":
                current.append(word[:-1])
            yield current
            current = []
            continue
        if " " in word:
            yield from _commands(_words(word))
        current.append(word)
    yield current


def vpipe_invocations(line: str):
    """The argument lists given to `vpipe` in a command line: `vpipe ARGS`, `.venv/bin/vpipe ARGS`,
    `torchrun ... -m pipeline ARGS`, `srun ... .venv/bin/vpipe ARGS`."""
    for words in _commands(_words(line)):
        for i, word in enumerate(words):
            if word == "vpipe" or word.endswith("/vpipe"):
                if i == 0 or not words[i - 1].startswith("-"):  # not `createdb -U vpipe`
                    yield words[i + 1 :]
                    break
            if word == "-m" and i + 1 < len(words) and words[i + 1] == "pipeline":
                yield words[i + 2 :]
                break


def problems(args: list[str]) -> list[str]:
    args = [a for a in args if a != DEBUG]  # global: anywhere on the command line
    if not args or args[0] in ("-h", "--help"):
        return []
    command, options = args[0], [a.split("=", 1)[0] for a in args[1:] if a.startswith("-") and a != "-"]
    if command not in SUBCOMMANDS:
        return [f"no subcommand {command!r} (vpipe has {', '.join(SUBCOMMANDS)})"]
    known = SUBCOMMANDS[command]
    if known is None:
        known = TRAINING_OPTIONS | TRAINING_SPECIFIC.get(command, set())
        return [
            f"vpipe {command} has no option {o}"
            for o in options
            if o not in known and not o.startswith(TRAINING_PREFIXES)
        ]
    return [f"vpipe {command} has no option {o}" for o in options if o not in known]


def test_the_docs_have_vpipe_commands():
    found = [args for path in DOCS for _, line in bash_blocks(path) for args in vpipe_invocations(line)]
    assert len(found) > 20
    assert {args[0] for args in found if args} >= {"fit", "extract", "features", "classify", "add-dataset"}


def test_every_vpipe_command_in_the_docs_exists():
    failures = []
    for path in DOCS:
        for number, line in bash_blocks(path):
            for args in vpipe_invocations(line):
                failures += [f"{path.relative_to(ROOT)}:{number}: {p}\n    {line}" for p in problems(args)]
    assert not failures, "\n".join(failures)


def test_the_checker_catches_wrong_commands():
    assert (
        problems(["fit", "-c", "configs/x.yaml", "--trainer.max_epochs", "1", "--predict_split", "all"]) == []
    )
    assert problems(["classify", "a.mp4", "--ckpt", "X", "--topk=3"]) == []
    assert problems(["classify", "a.mp4", "--top-k", "3"]) == ["vpipe classify has no option --top-k"]
    assert problems(["fit", "--max_epochs", "3"]) == ["vpipe fit has no option --max_epochs"]
    assert problems(["train", "-c", "x"])[0].startswith("no subcommand 'train'")
    line = 'ssh n "cd /p && .venv/bin/vpipe extract --manifest m.csv --part $i/4" &'
    assert list(vpipe_invocations(line)) == [["extract", "--manifest", "m.csv", "--part", "$i/4"]]
    line = "torchrun --nnodes 2 -m pipeline fit -c C --trainer.devices 8  # comment --bad"
    assert list(vpipe_invocations(line)) == [["fit", "-c", "C", "--trainer.devices", "8"]]
    assert list(vpipe_invocations("createdb -h 127.0.0.1 -U vpipe mlflow")) == []


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_relative_links_point_at_existing_files_and_headings():
    failures = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                failures.append(f"{path.relative_to(ROOT)}: {target}: no file {file}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                failures.append(f"{path.relative_to(ROOT)}: {target}: no heading #{anchor}")
    assert not failures, "\n".join(failures)
