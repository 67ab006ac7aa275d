"""The scale on paper: all of AVA on this machine and on one data-centre GPU, from FLOP counts,
and the store size of every variant."""

from __future__ import annotations

import common


def scale_on_paper(measured: dict, flop_counters: dict, decode_s_per_image: float | None, device: dict,
                   gpu_util: float = 0.10) -> dict:
    """All of AVA: store sizes of every variant; extraction time on this machine from the
    measured end-to-end GFLOP/s; on one H100 from FLOP counts."""
    from mlsp.backbone import nets as backbones
    from mlsp.images import decode as images

    n = common.AVA["images"]
    h, w = common.AVA["mean_height"], common.AVA["mean_width"]
    ch, cw = images.crop_size(h, w)
    gpu = common.GPU_SPECS["H100 SXM"]
    gpu_cores = 16
    out = {"ava_images": n, "ava_mean_size": [h, w], "variants": [], "assumptions": [
        f"AVA: {n} images of mean size {h}x{w} (docs/paper.md, 'Stage 1: features'); FLOPs of the mean-size image "
        "stand for the mean "
        "FLOPs (FLOPs grow about linearly with pixels)",
        "this machine: total FLOPs / end-to-end GFLOP/s measured here on the mixed set (decode wait, write "
        "and merge included) for that backbone and precision; the pooling measured for that backbone stands "
        "for both (pooling is a negligible share of the FLOPs; wide stores write 25x more bytes)",
        f"GPU: one H100 SXM, dense peaks {gpu['bfloat16_tflops']} TFLOP/s bfloat16, {gpu['tf32_tflops']} "
        f"TF32 (TensorFlow's default for float32 convolutions on Ampere and newer), {gpu['float32_tflops']} "
        f"float32 without tensor cores ({gpu['source']}); 'bound' = at peak, 'estimate' = at an assumed "
        f"{gpu_util:.0%} of peak (--gpu-util): framework-level (TensorFlow/Keras) inference of Inception nets at "
        "batch 8 on odd image sizes is far from the dense peak; a GPU run of this script measures it",
        f"GPU decode: JPEG decoding and cropping on the host CPU, {gpu_cores} cores, at the per-image decode "
        "time measured here (single thread): the GPU estimate is the larger of compute and decode",
    ]}
    decode_total = decode_s_per_image * n / gpu_cores if decode_s_per_image else None
    for net in ("iv3", "irv2"):
        spec = backbones.get_backbone(net)
        counter = flop_counters.get(net)
        for views in (1, 8):
            if counter is None:
                continue
            gflop_img = (counter(ch, cw) * 8 if views == 8 else counter(h, w)) / 1e9
            total_pflop = gflop_img * n / 1e6
            for pooling in ("narrow", "wide"):
                cells = 1 if pooling == "narrow" else 25
                store_bytes = n * views * cells * spec.total_channels * 2
                row = {"net": net, "views": views, "pooling": pooling, "gflop_per_image": round(gflop_img, 1),
                       "total_pflop": round(total_pflop, 2), "store_bytes": store_bytes,
                       "store_gb": round(store_bytes / 1e9, 1)}
                for precision in ("float32", "bfloat16"):
                    rate = measured.get((net, precision))
                    if rate:
                        row[f"this_machine_{precision}_hours"] = round(total_pflop * 1e6 / rate / 3600, 1)
                for precision, peak in (("bfloat16", gpu["bfloat16_tflops"]), ("tf32", gpu["tf32_tflops"])):
                    bound = total_pflop * 1e3 / peak
                    est = bound / gpu_util
                    if decode_total:
                        est = max(est, decode_total)
                    row[f"h100_{precision}_bound_min"] = round(bound / 60, 1)
                    row[f"h100_{precision}_estimate_min"] = round(est / 60, 1)
                out["variants"].append(row)
    if decode_total:
        out["h100_host_decode_min"] = round(decode_total / 60, 1)
    out["measured_end_to_end_gflops"] = {f"{k[0]}/{k[1]}": round(v, 1) for k, v in measured.items()}
    out["note_on_device"] = f"figures measured on {device.get('kind')}: {device.get('name')}"
    return out
