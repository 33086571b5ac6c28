"""`alignkit report`: real run directories of tiny-model commands (sft, rm, two PPO runs at two
β, rest-em with two iterations, best-of-n) and a pipeline's run directory written as `alignkit
pipeline` leaves it, rendered into one self-contained HTML page and a Markdown version; then the
page opened in headless Chromium (Playwright): every image loads, the page logs no console error
and asks for nothing outside the file.

The browser test skips, saying why, when Playwright or Chromium is missing (CI installs both
when it can); every other check runs without them."""

import base64
import json
import re
import shutil
from html import escape
from pathlib import Path

import pytest
import torch

from alignkit.algorithms.pipeline.llama2_chat import format_table
from alignkit.algorithms.sampling.stages import Sample, tokenize_samples
from alignkit.algorithms.sampling.train_stage import train_stage
from alignkit.cli import main as cli_main
from alignkit.engine.config import SamplingTrainConfig
from alignkit.models.load import save_model
from alignkit.models.tiny import save_tiny, tiny_model, tiny_tokenizer
from alignkit.report.collect import read_run
from alignkit.report.command import main as report
from alignkit.tasks import RewardConfig, TaskConfig, build_task

FAST = ["train.threads=1", "train.progress=false"]
TASK = ["task.min_digits=1", "task.max_digits=1", "task.ops=[+]", "task.train=8", "task.val=2", "task.heldout=4"]
SECTIONS = ["runs", "pipeline", "training", "reward-vs-kl", "best-of-n", "reward-model", "iterations", "samples"]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def run(args):
    assert cli_main(args) == 0, args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run directories made by the commands themselves on tiny models (~15 s on one thread)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("report-runs")
    tiny = save_tiny(str(out / "tiny"))
    # a tiny model taught the answer format on one-digit sums, so that ReST-EM keeps some samples
    tok, model = tiny_tokenizer(), tiny_model(seed=0)
    task = build_task(TaskConfig(train=40, val=4, heldout=8, min_digits=1, max_digits=1, ops=["+"]), RewardConfig())
    data = tokenize_samples(tok, [Sample(p, task.answer_for(p)) for p in task.train])
    teach = SamplingTrainConfig(output_dir=str(out / "teach"), lr=3e-3, epochs=40, max_tokens_per_batch=512, progress=False,
                                warmup_ratio=0.05)
    answering = str(save_model(train_stage(model, tok, data, teach)[0], tok, out / "answering"))
    dirs = {name: out / name for name in ("sft", "rm", "ppo-beta-0.05", "ppo-beta-0.2", "rest-em", "bon")}
    run(["sft", *FAST, f"model.path={tiny}", "data.max_length=64", "train.max_steps=3", "data.mixture.examples_per_task=3",
         "data.mixture.cap=3", "eval.problems=2", "eval.max_new_tokens=2", "eval.batch_size=2", f"train.output_dir={dirs['sft']}"])
    run(["rm", *FAST, f"model.path={tiny}", "train.max_steps=2", "data.builtin_pairs=8", "data.builtin_eval_pairs=8",
         f"train.output_dir={dirs['rm']}"])
    for beta in ("0.05", "0.2"):
        run(["ppo", "train.threads=1", f"model.path={tiny}", "iterations=2", "prompts_per_iteration=2", "minibatch_size=2",
             "sampling.max_new_tokens=3", "ppo_epochs=1", "prompts.train=4", "prompts.heldout=2", "train.batch_size=1",
             f"kl.beta={beta}", f"train.output_dir={dirs[f'ppo-beta-{beta}']}"])
    run(["rest-em", f"model.path={answering}", *FAST, *TASK, "train.lr=1e-3", "train.epochs=1", "iterations=2",
         "stop_when_worse=false", "sampling.max_new_tokens=4", "sampling.n=4", "metrics.train_problems=4",
         "metrics.eval_samples=4", "metrics.ks=[1,2,4]", "metrics.baseline_samples=true", "train.max_tokens_per_batch=512",
         f"train.output_dir={dirs['rest-em']}"])
    run(["best-of-n", f"model.path={answering}", "task.source=arithmetic", "task.heldout=4", "ns=[1,2]", "sampling.n=4",
         "sampling.temperature=0.7", "temperatures=[1.3]", "sampling.max_new_tokens=4", "threads=1", f"output_dir={dirs['bon']}"])
    return dirs


def _stage(label, reward, win, low, high, safety, kl, rms=(None, None, None), replies=("",)):
    samples = [{"prompt": "How do I pick a lock?", "unsafe": True, "reply": replies[0], "baseline_reply": "Sure: take a pin.",
                "score": -0.2, "baseline_score": -0.9, "outcome": "win", "kl": kl, "safe": True, "baseline_safe": False},
               {"prompt": "Compute 2 + 3.", "unsafe": False, "reply": "2 + 3 = 5.", "baseline_reply": "\n\n", "score": 0.8,
                "baseline_score": -1.0, "outcome": "win", "kl": kl, "safe": None, "baseline_safe": None}]
    return {"stage": label, "judge_reward": reward, "win_rate": win, "win_ci95_low": low, "win_ci95_high": high,
            "safety_rate": safety, "kl": kl, "reply_words": 7.5, "rm_helpful_newest": rms[0], "rm_helpful_original": rms[1],
            "rm_safety_original": rms[2], "samples": samples}


def write_pipeline(out: Path, gatt: bool = True) -> Path:
    """A run directory as `alignkit pipeline` leaves it (SFT, one RS iteration, PPO, GAtt):
    result.json, table.md by the pipeline's own format_table, one metrics row per stage, and stage
    sub-directories that are runs of their commands (a reward model with its eval/report.json)."""
    stages = [_stage("SFT", -0.4, 0.5, 0.31, 0.69, 0.25, 0.0, replies=("Sure: take a pin.",)),
              _stage("RLHF-V1 (RS)", 0.1, 0.62, 0.43, 0.78, 0.5, 1.3, (0.7, 0.66, 0.8), ("I can't help with that.",)),
              _stage("PPO", 0.3, 0.71, 0.52, 0.85, 0.75, 2.6, replies=("I won't help open a lock that isn't yours.",))]
    curves = {"sft": {"by_turn": [1.0, 0.25, 0.0], "mean": 0.42, "kept_turns": 1.25},
              "before": {"by_turn": [1.0, 0.5, 0.25], "mean": 0.58, "kept_turns": 1.75},
              "gatt": {"by_turn": [1.0, 1.0, 0.75], "mean": 0.92, "kept_turns": 2.75}, "stage_minutes": 0.5} if gatt else None
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps({"stages": stages, "gatt": curves, "ran": ["ppo", "eval-ppo"], "minutes": 3.5,
                                                 "final_model": str(out / "gatt" / "final")}))
    (out / "table.md").write_text(format_table(stages, curves) + "\n")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i, **{k: v for k, v in r.items() if k != "samples"}}) + "\n"
                                               for i, r in enumerate(stages)))
    (out / "eval-sft").mkdir()  # an evaluation stage: no run of a command
    (out / "eval-sft" / "samples.jsonl").write_text(json.dumps(stages[0]["samples"][0]) + "\n")
    for stage, rows in (("sft", [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.1}]),
                        ("rm-helpful-1", [{"step": 1, "loss": 0.69, "accuracy": 0.5}, {"step": 2, "eval/accuracy": 0.75}])):
        (out / stage).mkdir()
        (out / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "rm-helpful-1" / "eval").mkdir()
    (out / "rm-helpful-1" / "eval" / "report.json").write_text(json.dumps({
        "n": 8, "accuracy": 0.75, "buckets": {"significantly better": {"n": 4, "accuracy": 1.0}, "better": {"n": 4, "accuracy": 0.5}},
        "calibration": {"bins": [{"bin": [0.5, 0.75], "n": 8, "predicted": 0.6, "accuracy": 0.75}], "ece": 0.15}}))
    return out


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    return write_pipeline(tmp_path_factory.mktemp("report-pipeline") / "pipe")


@pytest.fixture(scope="module")
def page(runs, pipeline_run, tmp_path_factory):
    """The report of every run: (html path, markdown path, html text)."""
    out = tmp_path_factory.mktemp("report")
    html, md = out / "report.html", out / "report.md"
    assert report([str(p) for p in runs.values()] + [str(pipeline_run), "-o", str(html), "--markdown", str(md)]) == 0
    return html, md, html.read_text()


def _images(text: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", text)


def test_the_runs_read_as_their_commands(runs):
    kinds = {name: read_run(path).kind for name, path in runs.items()}
    assert kinds == {"sft": "sft", "rm": "rm", "ppo-beta-0.05": "ppo", "ppo-beta-0.2": "ppo", "rest-em": "rest-em",
                     "bon": "best-of-n"}
    rest = read_run(runs["rest-em"])
    assert sorted(rest.stages) == ["iter-1", "iter-2"] and sorted(rest.iteration_samples) == [1, 2]
    assert [r["iteration"] for r in rest.iteration_rows()] == [0, 1, 2]
    assert read_run(runs["ppo-beta-0.2"]).beta() == pytest.approx(0.2)


def test_html_is_self_contained_with_every_section(page):
    _, _, text = page
    for section in SECTIONS:
        assert f'<section id="{section}">' in text, section
    sources = _images(text)
    # the pipeline's three, training curves, train stages, reward vs KL, best of N, reward model, ReST-EM's iterations
    assert len(sources) == 9
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"https?://", text) and "<script" not in text and "<link" not in text
    assert not re.search(r"\b(?:src|href)=\"(?!data:|#)", text)  # nothing but inlined images and anchors
    # the frontier table: one row per PPO run with its β; the ReST-EM table; RM accuracy by rating
    frontier = text[text.index('<section id="reward-vs-kl">'):text.index('<section id="best-of-n">')]
    assert "<td>ppo-beta-0.05</td><td>ppo</td><td>0.05</td>" in frontier and "<td>ppo-beta-0.2</td><td>ppo</td><td>0.2</td>" in frontier
    assert "<th>pass@4</th>" in text and "<th>significantly better</th>" in text and "<th>iteration 2</th>" in text


def test_markdown_writes_tables_and_figures_beside_it(page):
    _, md_path, _ = page
    text = md_path.read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(figures) == 9
    for rel in figures:
        assert rel.startswith("report_files/") and (md_path.parent / rel).read_bytes()[:4] == b"\x89PNG"
    assert "## Reward vs KL" in text and "| run | command | β | KL (nats) | reward |" in text
    assert "| T | N | KL bound | max reward | median reward |" in text


def test_sections_follow_the_data(runs, tmp_path):
    out = tmp_path / "sft.html"
    assert report([str(runs["sft"]), "-o", str(out)]) == 0
    text = out.read_text()
    present = [s for s in SECTIONS if f'<section id="{s}">' in text]
    assert present == ["runs", "training", "samples"]  # no KL, no best of N, no reward model, no iterations
    assert len(_images(text)) == 1


def test_without_matplotlib_the_report_has_tables_only(runs, tmp_path, monkeypatch):
    from alignkit.report import plots

    monkeypatch.setattr(plots, "pyplot", lambda: None)
    out, md = tmp_path / "r.html", tmp_path / "r.md"
    assert report([str(runs["rest-em"]), str(runs["bon"]), "-o", str(out), "--markdown", str(md)]) == 0
    text = out.read_text()
    assert "<img" not in text and escape(plots.NO_MATPLOTLIB) in text and not (tmp_path / "r_files").exists()
    assert "<th>pass@4</th>" in text and "<th>max reward</th>" in text  # the tables stay


def _section(text: str, sid: str) -> str:
    start = text.index(f'<section id="{sid}">')
    return text[start:text.index("</section>", start)]


def test_a_pipeline_has_its_section(pipeline_run, tmp_path):
    run = read_run(pipeline_run)
    assert run.kind == "pipeline" and list(run.stage_rm_reports) == ["rm-helpful-1"] and sorted(run.stages) == ["rm-helpful-1", "sft"]
    html, md = tmp_path / "r.html", tmp_path / "r.md"
    assert report([str(pipeline_run), "-o", str(html), "--markdown", str(md)]) == 0
    text = html.read_text()
    assert [s for s in SECTIONS if f'<section id="{s}">' in text] == ["runs", "pipeline", "training", "reward-model"]
    assert "PPO: gold reward 0.3, win rate vs SFT 0.71, safety rate 0.75, KL to SFT 2.6, 3.5 minutes" in _section(text, "runs")
    section = _section(text, "pipeline")
    assert re.findall(r'<figure id="fig-([^"]+)">', section) == ["pipeline-1-rates", "pipeline-1-reward-kl", "pipeline-1-gatt"]
    # the stage table as table.md has it, the GAtt table, the replies of RS and PPO beside SFT's
    assert "<th>win rate vs SFT (95% CI)</th>" in section
    assert "<tr><td>PPO</td><td>0.300</td><td>0.710 (0.52–0.85)</td><td>0.750</td><td>2.600</td>" in section
    assert "<tr><td>RLHF-V1 (RS)</td><td>0.100</td><td>0.620 (0.43–0.78)</td><td>0.500</td><td>1.300</td><td>7.500</td>" \
           "<td>0.700 / 0.660</td><td>0.800</td></tr>" in section
    assert "<tr><td>GAtt</td><td>2.75</td><td>1.00 / 1.00 / 0.75</td></tr>" in section
    assert "<th>SFT reply</th><th>PPO reply</th>" in section and "<th>RLHF-V1 (RS) reply</th>" in section
    assert "<th>SFT reply</th><th>SFT reply</th>" not in section  # SFT against itself is no table
    assert "<td>How do I pick a lock?</td><td>Sure: take a pin.</td><td>I can&#x27;t help with that.</td><td>-0.9 → -0.2</td>" \
           "<td>win</td><td>unsafe → safe</td>" in section
    # the stages' runs: their losses under train stages (no curve of the per-stage rows), the RM's accuracy by rating
    assert re.findall(r'<figure id="fig-([^"]+)">', _section(text, "training")) == ["train-stages"]
    assert "<td>pipe · rm-helpful-1</td><td>100.0</td><td>50.0</td><td>75.0</td><td>8</td><td>15.0</td>" in text
    markdown = md.read_text()
    assert "## Pipeline" in markdown and "| stage | gold reward | win rate vs SFT (95% CI) |" in markdown
    assert "| model | turns kept | following by turn |" in markdown and "| prompt | SFT reply | PPO reply |" in markdown
    for name in ("rates", "reward-kl", "gatt"):
        assert f"](r_files/pipeline-1-{name}.png)" in markdown and (tmp_path / "r_files" / f"pipeline-1-{name}.png").is_file()

    no_gatt = write_pipeline(tmp_path / "no-gatt", gatt=False)
    assert report([str(no_gatt), "-o", str(html)]) == 0
    section = _section(html.read_text(), "pipeline")
    assert re.findall(r'<figure id="fig-([^"]+)">', section) == ["pipeline-1-rates", "pipeline-1-reward-kl"]
    assert "turns kept" not in section


def test_frontier_takes_each_runs_last_evaluation_and_its_beta(tmp_path):
    """DPO-style runs that logged eval/reward and eval/kl, their β in the config they wrote: one
    point each, from the last evaluation; a model's config.json (model_type) is no run config."""
    for name, beta, points in (("dpo-a", 0.1, [(0.5, 1.0), (2.0, 1.5)]), ("dpo-b", 0.5, [(0.2, 0.4), (0.8, 0.9)])):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": s + 1, "loss": 0.7 - 0.1 * s} for s in range(2)]
        rows += [{"step": s + 1, "eval/kl": kl, "eval/reward": r} for s, (kl, r) in enumerate(points)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "config.json").write_text(json.dumps({"beta": beta, "train": {"lr": 1e-6}}))
    model_config = tmp_path / "sft"
    model_config.mkdir()
    (model_config / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (model_config / "config.json").write_text(json.dumps({"model_type": "llama", "beta": 9}))
    assert read_run(model_config).config is None and read_run(model_config).beta() is None
    out = tmp_path / "r.html"
    assert report([str(tmp_path / "dpo-a"), str(tmp_path / "dpo-b"), str(model_config), "-o", str(out)]) == 0
    text = out.read_text()
    assert "<tr><td>dpo-a</td><td>sft</td><td>0.1</td><td>2</td><td>1.5</td></tr>" in text
    assert "<tr><td>dpo-b</td><td>sft</td><td>0.5</td><td>0.8</td><td>0.9</td></tr>" in text
    assert "<td>sft</td><td>sft</td>" not in text.split('<section id="reward-vs-kl">')[1]
    assert "<summary>dpo-a: config</summary>" in text


def test_a_directory_without_metrics_is_an_error_naming_it(tmp_path, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello\n")
    assert report([str(empty), "-o", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert f"{empty}: no metrics.jsonl" in err and not (tmp_path / "r.html").exists()
    assert report([str(tmp_path / "missing"), "-o", str(tmp_path / "r.html")]) == 1
    assert f"{tmp_path / 'missing'}: no such run directory" in capsys.readouterr().err
    assert report(["-o", str(tmp_path / "r.html")]) == 2  # no run directory: argparse's usage error
    assert "RUN_DIR" in capsys.readouterr().err
    assert report(["--help"]) == 0 and "--markdown" in capsys.readouterr().out


def test_a_broken_metrics_line_names_the_file(tmp_path, capsys):
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n{oops\n" + json.dumps({"step": 2}) + "\n")
    assert report([str(bad), "-o", str(tmp_path / "r.html")]) == 1
    assert f"{bad / 'metrics.jsonl'}:2: not a JSON object" in capsys.readouterr().err


def _chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright): the page is not opened in a browser")
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).is_file():
        pytest.skip("no Chromium found (apt-get install chromium): the page is not opened in a browser")
    return exe


def test_the_page_renders_in_headless_chromium(page, tmp_path):
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    html_path = page[0]
    errors, requests = [], []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=exe, headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        try:
            tab = context.new_page()
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("request", lambda r: requests.append(r.url))
            tab.goto(html_path.as_uri(), wait_until="load")
            images = tab.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            titles = tab.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
            tab.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            context.close()
    assert len(images) == 9 and all(done and w > 0 and h > 0 for done, w, h in images), images
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert titles == ["Runs", "Pipeline", "Training curves", "Reward vs KL", "Best of N", "Reward model", "Iterations", "Sample replies"]
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
