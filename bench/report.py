"""Render benchmark results (bench/results/*.json) as markdown.

    python bench/report.py                      # newest full run of each kind -> bench/RESULTS.md
    python bench/report.py FILE.json [...] -o -  # given runs, to stdout

Each kind of run has its own section renderer (``extract`` now; ``train`` joins with
bench_train.py); the targets table is the same for every kind.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402


def fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if 0.999 < value < 1.0:  # correlations: the digits that matter
            return f"{value:.6f}"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v, digits) for v in value)
    return str(value)


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_targets(record: dict) -> str:
    rows = []
    for t in record.get("targets", []):
        met = {True: "**met**", False: "**missed**", None: "-"}[t["met"]]
        rows.append([t["name"], f"{fmt(t['value'])}{t['unit']}", t["target"], met, t["why"]])
    return table(["figure", "value", "target", "", "detail"], rows)


def isa_of(record: dict) -> str:
    """The widest instruction set of the run's CPU (AVX-512 BF16, AVX-512, AVX2): recorded since
    issue 23; derived from the recorded flags for older runs."""
    m = record["machine"]
    return m.get("isa") or common.isa_of({k for k, on in m["flags"].items() if on})


def machine_line(record: dict) -> str:
    m, v, d = record["machine"], record["versions"], record.get("device", {})
    flags = ", ".join(k for k, on in m["flags"].items() if on and k.startswith(("avx512", "amx")))
    flags = f"instruction set {isa_of(record)}" + (f": {flags}" if flags else "")
    dev = f"; device: {d.get('kind')} {d.get('name')}" if d.get("kind") == "gpu" else ""
    return (f"{m['cpu_model']}, {m['usable_cpus']} usable CPUs ({flags}), {m['memory_gib']} GiB{dev}; "
            f"Python {v['python']}, TensorFlow {v['tensorflow']}, Keras {v['keras']}, NumPy {v['numpy']}, "
            f"h5py {v['h5py']}, OpenCV {v['opencv']}; mlsp at {v.get('git_commit')}"
            + (" (mlsp/, heads/ or cli.py modified)" if v.get("mlsp_code_modified") else ""))


def new_size_cost(cost):
    """First-seen over seen-before forward time: over the images undisturbed in both passes
    where there are some, else over all (corrected)."""
    if not cost:
        return None
    if cost.get("first_over_repeat_clean_pairs") is not None:
        return cost["first_over_repeat_clean_pairs"]
    return cost["first_over_repeat"]


def extract_intro(record: dict, source: str = "") -> list:
    """Title, machine, the image sets and the matmul reference."""
    sets, mm = record["figures"]["sets"], record["reference"]["matmul"]
    mixed, uniform = sets["mixed"], sets["uniform"]
    return [f"## Extraction ({'quick' if record['args'].get('quick') else 'full'} run, {record['started']})", "",
            f"Machine: {machine_line(record)}. Run took {record.get('seconds', 0):.0f} s"
            + (f"; file `{source}`." if source else "."), "",
            f"Images: {mixed['images']} JPEGs (quality 90) of {mixed['distinct_sizes']} distinct "
            f"sizes, sides {mixed['side_range'][0]}-{mixed['side_range'][1]} px, mean "
            f"{mixed['mean_pixels'] / 1e3:.0f} kpx; one-resolution set {uniform['images']} x "
            f"{uniform['size'][0]}x{uniform['size'][1]} (same mean pixel count). Random backbone "
            "weights, 8 views per image, mlsp defaults (2 decode threads, prefetch 4).", "",
            "Dense matmul 4096x4096 in this run (the reference): " + ", ".join(
                f"{p} {m['gflops_median']:.0f} GFLOP/s (max {m['gflops_max']:.0f})" for p, m in mm.items()) + ".", ""]


def extract_overview(record: dict) -> list:
    """One row per backbone and precision: mlsp on the mixed set, and how to read the columns."""
    rows = []
    for key, res in record["figures"]["extract"].items():
        for precision, pr in res["precisions"].items():
            m = pr["mixed"]
            nv = pr.get("vs_naive")
            rows.append([key, precision, f"{fmt(m['images_per_s_corrected'])} ({fmt(m['images_per_s'])})",
                         m["s_per_image_corrected"], m["gflop_per_image"],
                         m["forward_gflops_corrected"], f"{100 * m['efficiency']:.0f}%", isa_of(record),
                         f"{100 * m['time_share']['forward']:.0f}% / {100 * m['time_share']['wait_decode']:.1f}% / "
                         f"{100 * (m['time_share']['write'] + m['time_share']['merge']):.1f}%",
                         pr["mixed_cost"]["per_image"] if "mixed_cost" in pr else None,
                         new_size_cost(pr.get("new_shape_cost")),
                         nv["speedup"] if nv else None,
                         f"{m['correction']['clean_steps']}/{m['images']}, {fmt(m['phase']['other_cores'])}"])
    return [table(["backbone", "precision", "images/s (as measured)", "s/image", "GFLOP/image", "forward GFLOP/s",
                   "of matmul", "ISA", "forward / decode wait / write+merge", "mixed cost", "new size cost", "x naive",
                   "undisturbed images, other load (cores)"], rows), "",
            "*images/s*: the whole `extract()` call (find inputs, decode ahead, forward, shards, final merge into "
            "one store), model built and traced once beforehand. *forward GFLOP/s*: FLOPs counted from the model "
            "at each view's size, over the time inside the forward passes. *mixed cost*: s/image on the mixed set "
            "over s/image on the one-resolution set. *new size cost*: forward time of images whose size was new to the "
            "process over a second pass on the same images. *x naive*: the naive baseline's seconds over mlsp's on the same "
            "first images. *undisturbed images, other load*: the images during whose forward pass other processes "
            "used at most 0.15 CPU cores, and the cores other processes used over the whole measurement. Figures are "
            "corrected image by image for other processes' load: a disturbed image's forward time is replaced by "
            "its FLOPs at the rate of the undisturbed ones (the value as measured is in parentheses; "
            "see bench/README.md).", ""]


def extract_naive(record: dict) -> list:
    """The naive baseline taken apart: mlsp's graph over predict, then batching and decode threads."""
    rows = []
    for key, res in record["figures"]["extract"].items():
        for precision, pr in res["precisions"].items():
            if "naive" not in pr:
                continue
            nv, b1, vs = pr["naive"], pr["graph_batch1"], pr["vs_naive"]
            rows.append([key, precision, vs["images"], nv["s_per_image_corrected"], b1["wall_s_corrected"] / b1["images"],
                         vs["mlsp_s_same_images"] / vs["images"], nv["forward_gflops_corrected"],
                         b1["forward_gflops_corrected"],
                         nv["predict_traces_during_run"], vs["gain_graph_over_predict"], vs["gain_batch_and_threads"],
                         vs["speedup"]])
    if not rows:
        return []
    return ["Against the naive baseline (decode in the main thread, `model.predict` per view, batch 1):", "",
            table(["backbone", "precision", "images", "naive s/image", "graph batch-1 s/image",
                   "mlsp s/image", "naive GFLOP/s", "graph batch-1 GFLOP/s", "predict retraces",
                   "mlsp graph vs predict", "batch 8 + threads", "total"], rows), ""]


def extract_precision(record: dict) -> list:
    """bfloat16 against float32: speed and the fidelity of the stored features."""
    rows = []
    for key, res in record["figures"]["extract"].items():
        if "precision_speedup" in res:
            name, s = next(iter(res["precision_speedup"].items()))
            fid = res["fidelity"]
            rows.append([key, name, s, res["precision_speedup"]["forward_only"], fid["overall"]["max_rel"],
                         fid["overall"]["mean_rel"], f"{fid['overall']['pearson']:.6f}",
                         f"{fid['worst_block_max_rel']['block']} {fmt(fid['worst_block_max_rel']['max_rel'])}",
                         f"{fid['worst_block_pearson']['block']} {fid['worst_block_pearson']['pearson']:.6f}"])
    if not rows:
        return []
    return ["Precision (same random weights, same images; features as stored, float16):", "",
            table(["backbone", "speed-up", "images/s", "forward only", "max_rel", "mean_rel", "pearson",
                   "worst block, max_rel", "worst block, pearson"], rows), "",
            "max_rel = max|a-b| / max|a| over all stored values (a float32, b bfloat16; per block over that "
            "block's channels); mean_rel = mean|a-b| / mean|a|; pearson over all values.", ""]


def extract_decode(record: dict) -> list:
    """Decode-ahead threads against decoding in the main thread (workers=0)."""
    f = record["figures"]
    rows = []
    for key, res in f["extract"].items():
        for precision, pr in res["precisions"].items():
            sd = pr.get("serial_decode")
            if sd:
                rows.append([key, precision, sd["images"], sd["wait_share_threaded"], sd["wait_share_serial"],
                             sd["threaded_over_serial_speed"]])
    if not rows:
        return []
    return [f"Waiting on decode (decode + 8 crops alone: {1000 * f['decode']['s_per_image']:.1f} ms per image, "
            "one thread):", "",
            table(["backbone", "precision", "images", "share waiting, 2 threads", "share decoding, workers=0",
                   "speed-up of threads"], rows), ""]


def extract_rss(record: dict) -> list:
    """Peak RSS of the real command in fresh processes, as the number of images grows."""
    rss = record["figures"].get("rss")
    if not rss:
        return []
    c = rss["config"]
    return [f"Peak RSS of `cli.py extract` in fresh processes ({c['net']} {c['pooling']}, {c['precision']}, 8 views, "
            f"images of {c['image_size'][0]}x{c['image_size'][1]}; {rss['feature_mib_per_image']:.1f} MiB of "
            "float16 features per image):", "",
            table(["images", "peak RSS MiB (whole process)", "RSS after the first image", "max RSS in the loop",
                   "RSS at the loop's end", "max RSS in the final merge", "wall s", "CPU s"],
                  [[r["images"], r["peak_rss_mib"], r.get("rss_first_image_mib"), r.get("rss_loop_max_mib"),
                    r.get("rss_loop_end_mib"), r.get("rss_merge_max_mib"), r["wall_s"], r["cpu_s"]]
                   for r in rss["runs"]]), ""]


def extract_scale(record: dict) -> list:
    """All of AVA on paper: this machine and one H100, and the store size of every variant."""
    sc = record["figures"].get("scale")
    if not sc:
        return []
    rows = [[v["net"], v["pooling"], v["views"], v["gflop_per_image"], v["store_gb"],
             v.get("this_machine_float32_hours"), v.get("this_machine_bfloat16_hours"),
             v.get("h100_bfloat16_bound_min"), v.get("h100_bfloat16_estimate_min"), v.get("h100_tf32_estimate_min")]
            for v in sc["variants"]]
    return [f"All of AVA on paper ({sc['ava_images']:,} images, mean {sc['ava_mean_size'][0]}x"
            f"{sc['ava_mean_size'][1]}):", "",
            table(["backbone", "pooling", "views", "GFLOP/image", "store GB", "here float32 h",
                   "here bfloat16 h", "H100 bf16 bound min", "H100 bf16 est. min", "H100 TF32 est. min"], rows), "",
            "Assumptions: " + " ".join(f"({i + 1}) {a}." for i, a in enumerate(sc["assumptions"])), ""]


def targets_and_notes(record: dict) -> list:
    """The targets table, then the run's notes."""
    return ["Targets:", "", render_targets(record), ""] + [f"- {note}" for note in record.get("notes", [])]


# the sections of an extraction run, in the order they appear
EXTRACT_SECTIONS = (extract_overview, extract_naive, extract_precision, extract_decode, extract_rss, extract_scale,
                    targets_and_notes)


def render_extract(record: dict, source: str = "") -> str:
    out = extract_intro(record, source)
    for section in EXTRACT_SECTIONS:
        out += section(record)
    return "\n".join(out)


def render_profile(record: dict, source: str = "") -> str:
    a = record["args"]
    out = [f"## Where a forward pass spends its time ({record['started']})", "",
           f"TensorFlow's profiler on mlsp's extractor graph, {a['views']} views of {a['size']}, random weights "
           f"(`bench/profile_forward.py`{', file `' + source + '`' if source else ''}). Op time summed per family; "
           "independent ops run in parallel on the 2 inter-op threads, so op time exceeds wall time. "
           "*fixed* (older runs, before mlsp folded its batch norms): batch norm folded into the convolutions and "
           "wide pooling as two matmuls; *unfolded* (`--unfolded`): mlsp's graph without the folding. "
           "*other load*: CPU cores other processes used meanwhile (a loaded run's shares still hold, its speed "
           "does not).", "", f"Machine: {machine_line(record)}.", ""]
    families = []
    for fig in record["figures"].values():
        fig["by_family"] = {("wide pooling (einsum or matmuls)" if k.startswith("pooling matmuls") else k): v
                            for k, v in fig["by_family"].items()}
        for fam in fig["by_family"]:
            if fam not in families:
                families.append(fam)
    header = ["graph", "wall s", "GFLOP/s", "other load (cores)"] + families
    rows = []
    for name, fig in record["figures"].items():
        rows.append([name, fig["wall_s"], fig["gflops"], fig.get("phase", {}).get("other_cores")]
                    + [f"{100 * fig['by_family'][f]['share']:.1f}%" if f in fig["by_family"] else "-" for f in families])
    out.append(table(header, rows))
    return "\n".join(out)


def render_fixes(record: dict, source: str = "") -> str:
    a = record["args"]
    out = [f"## Two changes to mlsp's forward graph, measured ({record['started']})", "",
           f"The experiment script that led to both changes (retired; in the history)"
           f"{' (file `' + source + '`)' if source else ''}: {a['views']} views of "
           f"{a['size']}, median of {a['reps']} interleaved repetitions, each after waiting for a quiet machine. "
           "*pool*: wide pooling as two broadcast matmuls instead of `einsum`; *fold*: batch norm folded into the "
           "convolution before it. max_rel against the unchanged graph of the same precision, and against float32 "
           "unchanged.", ""]
    rows = []
    for key, fig in record["figures"].items():
        for name, v in fig["variants"].items():
            rows.append([key, name, v["s"], v["gflops"], f"x{v['speedup']:.2f}", v["max_rel_vs_as_is"],
                         v.get("max_rel_vs_float32")])
    out.append(table(["graph", "variant", "forward s", "GFLOP/s", "speed-up", "max_rel vs unchanged",
                      "max_rel vs float32"], rows))
    return "\n".join(out)


def render_whole(record: dict, source: str = "") -> str:
    """mlsp extract against the naive way as whole processes (bench/whole_process.py)."""
    fig = record["figures"]["whole_process"]
    names = {"naive": "naive, TensorFlow's default", "naive-onednn": "naive, oneDNN forced on",
             "mlsp": "mlsp extract (forward cache warm)", "mlsp-first": "mlsp extract, first run (no cache)"}
    rows = [[names.get(k, k), v["wall_s_min"], v["wall_s_median"], v["wall_s_max"], v["cpu_s_median"],
             v["max_other_cores"], fig["ratios"].get(k, "")] for k, v in fig["summary"].items()]
    return "\n".join([f"## Whole processes against the naive way ({record['started']})", "",
                      f"Machine: {machine_line(record)}" + (f"; file `{source}`." if source else "."), "",
                      f"{fig['images']} JPEGs of {len(fig['sizes'])} AVA-like sizes, {fig['config']}, 8 views, random "
                      f"weights; TensorFlow's oneDNN default on this CPU: {fig['tf_onednn_default']}. Each process "
                      "timed from start to exit, repetitions interleaved.", "",
                      table(["process", "wall s min", "median", "max", "CPU s (median)", "other load (cores, max)",
                             "naive / this (median of pairs)"], rows), "",
                      *([f"mlsp against the naive way with oneDNN forced on: "
                         f"{fmt(fig['ratios']['mlsp_vs_naive_onednn'])}x.", ""]
                        if "mlsp_vs_naive_onednn" in fig["ratios"] else []),
                      render_targets(record), ""])


RENDERERS = {"extract": render_extract, "whole": render_whole, "profile": render_profile, "fixes": render_fixes}


def newest(kind: str, folder: str = common.RESULTS_DIR, quick: bool = False) -> list:
    """The newest run of ``kind`` on each instruction set (AVX-512 BF16, AVX-512, AVX2, ...), widest
    first: a CPU's efficiency depends on it, so each keeps its own tables."""
    files = sorted(glob.glob(os.path.join(folder, f"{kind}-*.json")))
    by_isa: dict = {}
    for path in files:
        if path.endswith("-quick.json") == quick:
            with open(path) as handle:
                by_isa[isa_of(json.load(handle))] = path  # sorted by time: the newest wins
    order = [label for _, label in common.ISA_LEVELS]
    return [by_isa[k] for k in sorted(by_isa, key=lambda k: order.index(k) if k in order else len(order))]


FINDINGS = os.path.join(HERE, "FINDINGS.md")


def render(paths: list) -> str:
    parts = ["# mlsp benchmark results", "",
             "Generated by `python bench/report.py` from the JSON files in `bench/results/` (see `bench/README.md` "
             "for how to run the benchmarks and what each figure means)"
             + (", with the analysis in `bench/FINDINGS.md`." if os.path.exists(FINDINGS) else "."), ""]
    if os.path.exists(FINDINGS):
        with open(FINDINGS) as handle:
            text = handle.read().strip()
        # its headings go one level down: its title becomes a section of this file
        parts += ["\n".join("#" + line if line.startswith("#") else line for line in text.splitlines()), ""]
    for path in paths:
        with open(path) as handle:
            record = json.load(handle)
        renderer = RENDERERS.get(record["kind"])
        rel = os.path.relpath(path, common.ROOT)
        parts.append(renderer(record, rel) if renderer else f"## {record['kind']}\n\n" + render_targets(record))
        parts.append("")
    return "\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description="Render bench/results/*.json as markdown.")
    p.add_argument("files", nargs="*",
                   help="result files (default: the newest full run of each kind on each instruction set)")
    p.add_argument("-o", "--output", default=os.path.join(HERE, "RESULTS.md"), help="'-' for stdout")
    p.add_argument("--quick", action="store_true", help="take the newest quick runs instead")
    args = p.parse_args(argv)
    paths = args.files or [p for k in RENDERERS for p in newest(k, quick=args.quick)]
    if not paths:
        sys.exit("no results found in bench/results/; run python bench/bench_extract.py first")
    text = render(paths)
    if args.output == "-":
        print(text)
    else:
        with open(args.output, "w") as handle:
            handle.write(text)
        print(f"wrote {args.output} from {', '.join(os.path.relpath(p, common.ROOT) for p in paths)}")


if __name__ == "__main__":
    main()
