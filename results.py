"""Everything a person reads about a run: cv.json, report.txt, learning curves, the confusion
plot, the most confused pairs, report.html with the error audit, and the leaderboard of runs.

inference.py writes a run's reports after predicting; train.py writes cv.json and report.html
once every fold is done; report.py (the command) rewrites them and the leaderboard.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from arg import Config, FIELDS
from cache import Clips
from dataset import targets
from metrics import most_confused, multilabel_scores, scores
from model import make_frontend
from predictor import OPEN
from reject import det_curve, detection_at
from runs import (COMMAND, CONFUSION, CV, HISTORY, REJECT, REPORT_HTML, REPORT_TXT, RESULT, Run,
                  Work, fold_done, read_config)
from util import atomic_write, read_table, write_json, write_text

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    _pyplot().close(fig)


def plot_confusion(y_true, y_pred, classes: list[str], title: str = ""):
    """Row-normalised confusion matrix with class names on both axes, sized for 30+ classes."""
    from sklearn.metrics import confusion_matrix

    plt = _pyplot()
    cm = confusion_matrix(y_true, y_pred, labels=range(len(classes)), normalize="true")
    n = len(classes)
    side = max(6.0, 0.32 * n + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, j in zip(*np.nonzero(cm >= 0.01)):
        ax.text(j, i, f"{cm[i, j]:.2f}"[1:] if cm[i, j] < 1 else "1", ha="center", va="center",
                fontsize=5.5, color="white" if cm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion (rows sum to 1)")
    fig.colorbar(im, fraction=0.04)
    fig.tight_layout()
    return fig


def plot_curves(histories: dict, title: str = ""):
    """Loss, accuracy and macro-F1 per epoch: train dashed, validation solid (a pretraining's
    probe dotted), one colour per fold of `histories` ({fold: history.csv table})."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ("loss", "acc", "f1")):
        for k, (fold, hist) in enumerate(sorted(histories.items())):
            for stage, style in (("train", "--"), ("val", "-"), ("probe", ":")):
                col = f"{stage}_{metric}"
                if col in hist and hist[col].notna().any():
                    ax.plot(hist.epoch, hist[col], style, marker=None if stage == "train" else "o",
                            ms=3, color=f"C{k}", label=f"fold {fold} {stage}")
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[-1].legend(handles, labels, fontsize=7, ncol=max(1, len(histories) // 3))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


DET_FLOOR = 1e-4  # where a DET plot draws a rate of 0


def plot_det(curve: pd.DataFrame, point: dict | None, title: str = ""):
    """The DET curve (reject.det_curve): words missed against strangers let in, both on a log
    scale, the operating point of reject.json marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    floor = DET_FLOOR  # a log scale has no 0: a perfect OOF's points are drawn there
    ax.plot(np.maximum(curve.false_accepts, floor), np.maximum(curve.miss, floor), "-",
            color="C0")
    if point:
        ax.plot([max(point["oof_false_accepts"], floor)], [max(1 - point["oof_detection"], floor)],
                "o", color="C3", label=f"threshold {point['threshold']:.3f}")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor / 2, 1.5)
    ax.set_ylim(floor / 2, 1.5)
    if ((curve.false_accepts == 0) | (curve.miss == 0)).any():
        ax.text(0.02, 0.02, f"0 is drawn at {floor:g}", transform=ax.transAxes, fontsize=7)
    ax.set_xlabel("false accepts (share of _unknown_ / _silence_ clips taken for a word)")
    ax.set_ylabel("miss rate (words not recognised)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- OOF and CV
def load_oof(run_dirs: list[Path], folds: list[int], name: str, classes: list[str],
             weights=None) -> tuple[pd.DataFrame, np.ndarray] | None:
    """The OOF table (path, row, fold, label) of `folds` and its probabilities, averaged over
    runs with `weights`; None when a fold of a run is unfinished or has no `name`.csv."""
    tables = []
    for d in run_dirs:
        paths = [Run.at(d).oof(k, name) for k in folds]
        if not all(p.is_file() and fold_done(p.parent) for p in paths):
            return None
        tables.append(pd.concat([pd.read_csv(p, keep_default_na=False) for p in paths])
                      .sort_values("row").reset_index(drop=True))
    probs = np.average(np.stack([t[classes].to_numpy() for t in tables]), axis=0, weights=weights)
    keep = ["path", "row", "fold", "label"] + (["secondary"] if "secondary" in tables[0] else [])
    return tables[0][keep], probs


def ranking_scores(table: pd.DataFrame, probs: np.ndarray, classes: list[str]) -> dict:
    """Macro mAP and ROC-AUC (metrics.multilabel_scores) of multilabel OOF rows; {} otherwise."""
    if "secondary" not in table:
        return {}
    truth = targets(table.assign(y=label_index(table.label, classes)), classes, True, 1.0)
    return multilabel_scores(torch.from_numpy(np.asarray(probs, np.float32)),
                             torch.from_numpy(truth))


def label_index(labels, classes: list[str]) -> np.ndarray:
    return pd.Series(labels).map({c: i for i, c in enumerate(classes)}).to_numpy()


def cv_summary(run_dirs: list[Path], classes: list[str], folds: list[int], out: Path,
               weights=None) -> dict | None:
    """Per-fold and overall OOF accuracy and macro-F1 of the (blended) runs, plain and with
    TTA where every fold has it, written to out/cv.json; None while a fold is unfinished."""
    result = {}
    for name, key in (("oof", "plain"), ("oof_tta", "tta")):
        got = load_oof(run_dirs, folds, name, classes, weights)
        if got is None:
            continue
        table, probs = got
        pred, true, fold = probs.argmax(1), label_index(table.label, classes), table.fold.to_numpy()
        def both(m):
            return {**scores(true[m], pred[m], len(classes)),
                    **ranking_scores(table[m], probs[m], classes)}

        result[key] = dict(overall=both(np.ones(len(table), bool)), clips=len(table),
                           folds={int(k): both(fold == k) for k in folds})
    if "plain" not in result:
        return None
    if "map" in result["plain"]["overall"]:
        result["map"] = result["plain"]["overall"]["map"]
    result.update(accuracy=result["plain"]["overall"]["acc"], folds=folds,
                  runs=[Path(d).name for d in run_dirs])
    write_json(result, Path(out) / CV)
    return result


def cv_report(run_dirs: list[Path], weights, folds: list[int], classes: list[str],
              out: Path) -> dict | None:
    """cv.json of the (blended) runs' OOF, then report.txt, confusion.png and the most
    confused pairs for the TTA OOF where there is one, else the plain one."""
    from sklearn.metrics import classification_report

    cv = cv_summary(run_dirs, classes, folds, out, weights)
    if cv is None:
        log.warning("a fold of %s is unfinished or lacks oof.csv: no CV report",
                    "+".join(d.name for d in run_dirs))
        return None
    table, probs = (load_oof(run_dirs, folds, "oof_tta", classes, weights)
                    or load_oof(run_dirs, folds, "oof", classes, weights))
    true, pred = label_index(table.label, classes), probs.argmax(1)
    write_text(classification_report(true, pred, labels=range(len(classes)), target_names=classes,
                                     digits=4, zero_division=0), out / REPORT_TXT)
    names = "+".join(d.name for d in run_dirs)
    save_figure(plot_confusion(true, pred, classes, f"{names}: OOF accuracy "
                               f"{(true == pred).mean():.4f} ({len(true)} clips)"),
                out / CONFUSION, dpi=110)
    for key in ("plain", "tta"):
        if key in cv:
            o = cv[key]["overall"]
            log.info("CV %s: accuracy %.4f, macro-F1 %.4f%s", key, o["acc"], o["f1"],
                     f", mAP {o['map']:.4f}, AUC {o.get('auc', float('nan')):.4f}"
                     if "map" in o else "")
    pairs = most_confused(true, pred, classes)
    if pairs:
        log.info("most confused (true -> predicted: count): %s",
                 ", ".join(f"{a}->{b}: {n}" for a, b, n in pairs))
    return cv


# ----------------------------------------------------------------------------- labels
def augmentation_label(cfg: dict) -> str:
    """The preset and what the run set differently from it: 'seed +p_pitch=0.5'."""
    preset = cfg.get("aug", "default")
    base = Config.preset(preset).to_dict()
    group = [n for n, f in FIELDS.items() if f.metadata["group"] == "augmentation" and n != "aug"]
    diff = [f"{n}={_short(cfg[n])}" for n in group
            if n in cfg and _short(cfg[n]) != _short(base[n])]
    return " ".join([preset, *(f"+{d}" for d in diff)])


def _short(v):
    return "-".join(map(_short, v)) if isinstance(v, (list, tuple)) else (
        f"{v:g}" if isinstance(v, float) else str(v))


# ----------------------------------------------------------------------------- report.html
def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _figure_uri(fig, dpi: int = 90) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    _pyplot().close(fig)
    return _data_uri(buf.getvalue(), "image/png")


def _audio_uri(wave: np.ndarray, sr: int) -> str:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="FLAC", subtype="PCM_16")
    return _data_uri(buf.getvalue(), "audio/flac")


def _image_uris(images: np.ndarray) -> list[str]:
    """PNG data URIs of (N, H, W) images (the model's log-mel inputs), low frequencies down."""
    plt = _pyplot()
    out = []
    for img in images:
        buf = io.BytesIO()
        plt.imsave(buf, img[::-1], cmap="magma", format="png")
        out.append(_data_uri(buf.getvalue(), "image/png"))
    return out


def _table(df: pd.DataFrame, cls: str = "") -> str:
    return df.to_html(index=False, escape=False, border=0, classes=cls,
                      float_format=lambda v: f"{v:.4f}")


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0} td,th{padding:3px 9px;border-bottom:1px solid #eee;
text-align:right} th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
.audit td{vertical-align:middle} .audit img{width:96px;height:96px;image-rendering:pixelated}
.wrong{color:#b00} code{background:#f4f4f4;padding:1px 4px;font-size:12px}
.kpi{display:inline-block;margin:6px 18px 6px 0} .kpi b{font-size:22px;display:block}
img.fig{max-width:100%} details{margin:8px 0}
"""


def html_scores(run: Run, folds: dict[int, Path]) -> tuple[list, pd.DataFrame]:
    """The headline numbers [(name, value)] and the per-fold CV table."""
    cv = json.loads(run.cv.read_text()) if run.cv.is_file() else {}
    kpis = [("CV accuracy", cv.get("plain", {}).get("overall", {}).get("acc")),
            ("CV accuracy, TTA", cv.get("tta", {}).get("overall", {}).get("acc")),
            ("CV macro-F1", cv.get("plain", {}).get("overall", {}).get("f1"))]
    test = json.loads(run.test_score.read_text()) if run.test_score.is_file() else {}
    for key, name in (("map", "CV mAP"), ("auc", "CV ROC-AUC")):
        if key in cv.get("plain", {}).get("overall", {}):
            kpis.append((name, cv["plain"]["overall"][key]))
    if "accuracy" in test:
        kpis.append((f"test accuracy ({test.get('with', '')})", test["accuracy"]))
    if "cmap_pad5" in test:
        kpis.append((f"test padded cmAP ({test.get('with', '')})", test["cmap_pad5"]))
    per_fold = []
    for k, d in sorted(folds.items()):
        done = json.loads((d / RESULT).read_text())
        row = {"fold": k}
        for key in ("plain", "tta"):
            fold_cv = cv.get(key, {}).get("folds", {}).get(str(k))
            if fold_cv:
                row[f"accuracy {key}"], row[f"macro-F1 {key}"] = fold_cv["acc"], fold_cv["f1"]
        row.update(epochs=done.get("epochs"), minutes=f"{done.get('seconds', 0) / 60:.1f}")
        per_fold.append(row)
    return kpis, pd.DataFrame(per_fold)


def html_per_class(true, pred, classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Precision, recall, F1 and clips per class (worst F1 first), and the most confused pairs."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, n = precision_recall_fscore_support(true, pred, labels=range(len(classes)),
                                                 zero_division=0)
    per_class = pd.DataFrame(dict(label=classes, precision=p, recall=r, f1=f, clips=n))
    pairs = pd.DataFrame(most_confused(true, pred, classes, 15),
                         columns=["true", "predicted as", "clips"])
    return per_class.sort_values("f1"), pairs


@torch.no_grad()
def seen_images(cfg, waves: np.ndarray) -> torch.Tensor:
    """(N, bands, frames): what a network of `cfg` hears of int16 `waves` (its own front end:
    the speech embedding's 32 bands, a CNN's -t log-mel), augmentation off."""
    return make_frontend(cfg).eval()(torch.from_numpy(np.ascontiguousarray(waves)))[:, 0]


def html_audit(work: Path, cfg, table: pd.DataFrame, probs: np.ndarray, true, classes: list[str],
               audit: int) -> pd.DataFrame:
    """The `audit` OOF clips with the highest loss: path, speaker, player, log-mel, labels."""
    train = read_table(Work(work).train_csv).set_index("row")
    pred, p_true = probs.argmax(1), probs[np.arange(len(true)), true]
    worst = np.argsort(-np.log(np.clip(p_true, 1e-12, 1)))[:audit]
    rows = table.row.to_numpy()[worst]
    waves = Clips.of(work, "train").read(rows, cfg.clip_samples)
    imgs = seen_images(cfg, waves)
    if imgs.shape[-1] > 128:
        imgs = torch.nn.functional.interpolate(imgs[:, None], size=(min(imgs.shape[1], 128), 128),
                                               mode="area")[:, 0]
    out, esc = [], html.escape
    for i, (k, img) in enumerate(zip(worst, _image_uris(imgs.numpy()))):
        row = table.iloc[k]
        said = esc(classes[pred[k]])
        out.append({
            "clip": f"<code>{esc(str(row.path))}</code><br>speaker "
                    f"{esc(str(train.loc[row.row, 'group']))}, fold {row.fold}",
            "listen": f'<audio controls preload="metadata" src="{_audio_uri(waves[i], cfg.sr)}">'
                      f"</audio>",
            "log-mel": f'<img src="{img}" alt="log-mel of {esc(str(row.path))}">',
            "label": esc(row.label),
            "predicted": f'<span class="wrong">{said}</span>' if pred[k] != true[k] else said,
            "p(predicted)": f"{probs[k, pred[k]]:.3f}", "p(label)": f"{p_true[k]:.3f}"})
    return pd.DataFrame(out)


def html_speakers(work: Path, table: pd.DataFrame, wrong: np.ndarray) -> pd.DataFrame:
    """The 15 speakers with the highest OOF error rate."""
    train = read_table(Work(work).train_csv).set_index("row")
    groups = train.loc[table.row, "group"].astype(str).to_numpy()
    spk = (pd.DataFrame(dict(speaker=groups, wrong=wrong)).groupby("speaker").wrong
           .agg(["sum", "size"]).rename(columns={"sum": "errors", "size": "clips"}))
    spk["error rate"] = spk.errors / spk.clips
    return (spk[spk.errors > 0].sort_values(["error rate", "errors"], ascending=False).head(15)
            .reset_index())


def html_reject(run: Run, table: pd.DataFrame, probs: np.ndarray, classes: list[str]) -> str:
    """Where the classes hold _unknown_ or _silence_: the DET curve of the OOF, the operating
    point inference.py chose (reject.json) and each word's detection at fixed false accepts;
    "" otherwise."""
    truth = table.label.to_numpy()
    if not np.isin(truth, OPEN).any():
        return ""
    point = json.loads((run.dir / REJECT).read_text()) if (run.dir / REJECT).is_file() else None
    det = _figure_uri(plot_det(det_curve(probs, truth, classes), point, f"{run.name}: OOF"))
    said = "" if point is None else (
        f"<p>Operating point (reject.json, inference.py --false-accepts {point['target']}): a "
        f"word needs probability &ge; {point['threshold']:.4f}; on the OOF it lets in "
        f"{100 * point['oof_false_accepts']:.1f} % of {point['open_clips']} other clips and "
        f"recognises {100 * point['oof_detection']:.1f} % of {point['word_clips']} words.</p>")
    hours = "" if point is None or "other_speech" not in point else html_per_hour(point)
    if point is not None and "keyword_stream" in point:
        hours += html_keyword_stream(point)
    return (f"<h2>Saying none of these: detection against false accepts</h2>{said}"
            f'<img class="fig" src="{det}" alt="DET curve">'
            f"{_table(detection_at(probs, truth, classes))}{hours}")


def html_per_hour(point: dict) -> str:
    """reject.json's other speech: the detections the rule over time let in per hour, the
    table of detection at fixed false accepts per hour, and the stream rule where one was
    fitted (inference.py --false-accepts-per-hour)."""
    other, rule = point["other_speech"], point["other_speech"]["rule"]
    stream = point.get("stream")
    fitted = "" if not stream else (
        f"<p>Stream rule (inference.py --false-accepts-per-hour {stream['target_per_hour']:g}; "
        f"export.py puts it in the model, predict.py applies it): windows every "
        f"{stream.get('hop', other['hop']):g} s, a word needs its probability, "
        f"averaged over {stream['smooth']} window(s), &ge; {stream['threshold']:.3f} in "
        f"{stream['patience']} window(s) in a row, {stream['refractory']:g} s apart: "
        f"{stream['fitted_per_hour']:.2f} per hour on the other speech"
        f"{' and the --fit-keywords recording' if 'fit_keywords' in stream else ''}.</p>")
    chosen = stream and stream.get("fit_keywords")
    if chosen:
        fitted += (f"<p>Chosen on {Path(chosen['file']).name} ({chosen['keywords']} words, "
                   f"{60 * chosen['hours']:.1f} min; inference.py --fit-keywords): the rule "
                   f"that detects most of them at that rate, {100 * chosen['detected']:.1f} "
                   f"%, of these:</p>{_table(pd.DataFrame(chosen['candidates']))}")
    return (f"<h3>Per hour of other speech</h3><p>{other['detections']} detections let in over "
            f"{other['hours']:.2f} h of {len(other['files'])} recording(s) read in windows every "
            f"{other['hop']:g} s (inference.py --other-speech): {other['per_hour']:.1f} per hour "
            f"at the operating point, each word's probability averaged over {rule['smooth']} "
            f"window(s), {rule['patience']} in a row, {rule['refractory']:g} s apart. Detection "
            f"(OOF) at fixed false accepts per hour:</p>{_table(pd.DataFrame(other['table']))}"
            f"{fitted}")


def plot_stream_det(bench: dict, title: str = ""):
    """The DET curve over time (reject.keyword_stream): keywords missed against false accepts
    per hour of the stream, the rates the table reads at and the fitted stream rule marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    curve = pd.DataFrame(bench["curve"])
    floor = DET_FLOOR
    ax.plot(np.maximum(curve.false_accepts_per_hour, 1e-2), np.maximum(curve.miss, floor), "-",
            color="C0")
    for rate in [r["false accepts per hour <="] for r in bench["table"]]:
        ax.axvline(rate, color="0.7", lw=0.8, ls="--")
    if bench.get("fitted"):
        f = bench["fitted"]
        ax.plot([max(f["false_accepts_per_hour"], 1e-2)], [max(f["miss"], floor)], "o",
                color="C3", label=f"the rule's threshold, {f['threshold']:.3f}")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-2 / 2, max(10.0, curve.false_accepts_per_hour.max() * 1.5))
    ax.set_ylim(floor / 2, 1.5)
    ax.set_xlabel(f"false accepts per hour ({bench['hours']:.2f} h; 0 drawn at 0.01)")
    ax.set_ylabel(f"keywords missed (of {bench['keywords']})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def html_keyword_stream(point: dict) -> str:
    """reject.json's keyword stream (inference.py --keyword-stream): the DET curve over time
    and the words missed at fixed false accepts per hour."""
    bench = point["keyword_stream"]
    rule = bench["rule"]
    fig = _figure_uri(plot_stream_det(bench, Path(bench["file"]).name))
    fitted = "" if not bench.get("fitted") else (
        f"<p>At the rule's own threshold ({bench['fitted']['threshold']:.3f}: the stream rule "
        f"fitted on other recordings, else the clip rule's): {100 * bench['fitted']['miss']:.1f}"
        f" % missed, {bench['fitted']['false_accepts_per_hour']:.2f} false accepts per hour "
        f"here.</p>")
    return (f"<h3>Keywords in a stream</h3><p>{bench['keywords']} keywords inside "
            f"{bench['hours']:.2f} h of other speech ({Path(bench['file']).name}), read in "
            f"windows; a detection counts for a keyword whose span (+0.5 s) its window overlaps, "
            f"any other is a false accept. Rule over time: {rule['smooth']} window(s) averaged, "
            f"{rule['patience']} in a row, {rule['refractory']:g} s apart.</p>"
            f'<img class="fig" src="{fig}" alt="DET curve over time">'
            f"{_table(pd.DataFrame(bench['table']))}{fitted}")


def write_html(run_dir: Path, work: Path, audit: int = 40) -> Path | None:
    """run_dir/report.html: config and command, CV per fold, test accuracy, learning curves,
    per-class table, confusion matrix, most confused pairs, the `audit` OOF clips with the
    highest loss (audio, log-mel, labels) and the speakers with the highest error rate. One
    self-contained file: images and audio are embedded. None while a fold is unfinished."""
    run, work = Run.at(run_dir), Path(work)
    classes = Work(work).classes()
    folds = run.folds()
    if not folds or not all(fold_done(d) for d in folds.values()):
        return None
    ks = sorted(folds)
    tta = load_oof([run.dir], ks, "oof_tta", classes)
    got = tta or load_oof([run.dir], ks, "oof", classes)
    if got is None:
        return None
    table, probs = got
    saved = read_config(folds[ks[0]])
    cfg = Config.from_dict(saved)
    true, pred = label_index(table.label, classes), probs.argmax(1)
    which = "with TTA" if tta else "plain"
    kpis, per_fold = html_scores(run, folds)
    hists = {k: pd.read_csv(d / HISTORY) for k, d in folds.items()
             if (d / HISTORY).is_file()}
    curves = _figure_uri(plot_curves(hists, f"{run.name}: every fold"))
    confusion = _figure_uri(plot_confusion(true, pred, classes, f"OOF {which}: accuracy "
                                           f"{(true == pred).mean():.4f}"), dpi=80)
    per_class, pairs = html_per_class(true, pred, classes)
    audit_rows = html_audit(work, cfg, table, probs, true, classes, audit)
    command = folds[ks[0]] / COMMAND
    command = command.read_text().strip() if command.is_file() else ""
    config = pd.DataFrame(sorted(saved.items()), columns=["setting", "value"])
    esc = html.escape
    body = f"""
<h1>{esc(run.name)}</h1>
<div>{esc(cfg.model)} at {cfg.size}x{cfg.size}, augmentation <code>{esc(augmentation_label(
        saved))}</code>, {cfg.epochs} epochs, {len(ks)} folds, {len(table)}
OOF clips &middot; written {time.strftime('%Y-%m-%d %H:%M')}</div>
<div>{''.join(f'<span class="kpi"><b>{v:.4f}</b>{esc(k)}</span>' for k, v in kpis
              if v is not None)}</div>
<details><summary>command and config</summary><p><code>{esc(command)}</code></p>
{_table(config)}</details>
<h2>Cross-validation per fold</h2>{_table(per_fold)}
<h2>Learning curves</h2><img class="fig" src="{curves}" alt="learning curves of every fold">
<h2>Per class (OOF {which}, worst F1 first)</h2>{_table(per_class)}
<h2>Confusion matrix</h2><img class="fig" src="{confusion}" alt="confusion matrix">
<h2>Most confused pairs</h2>{_table(pairs)}
{html_reject(run, table, probs, classes)}
<h2>Error audit: the {len(audit_rows)} OOF clips with the highest loss</h2>
<p>Listen for wrong labels, clipped words and noise: these are the clips to check first.</p>
{_table(audit_rows, "audit")}
<h2>Speakers with the highest error rate</h2>{_table(html_speakers(work, table, true != pred))}
"""
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{esc(run.name)}: run report</title><style>{CSS}</style></head>"
            f"<body>{body}</body></html>")
    write_text(page, run.dir / REPORT_HTML)
    return run.dir / REPORT_HTML
