"""Switch comparison on this CPU, 1 thread, CPU seconds per step (process time: waiting for a
core does not count on the shared machine); variants alternate, 3 repeats of off/channels_last."""
import json, time
from learn2defend.bench import BenchConfig, bench
cases = [("smallcnn", "digits", 0.18), ("smallcnn-pooled", "fake:3x32x32:10", 0.07)]
variants = {"off": {}, "channels_last": {"channels_last": True}}
methods = ["plain", "fgsm", "pgd-at", "grad-l2l", "fgsm-sdi"]
out = {}
def run(model, ds, w, name, sw, rep):
    t0 = time.perf_counter()
    r = bench(BenchConfig(model=model, dataset=ds, batch_size=64, steps=6, warmup=1, methods=methods,
                          attacker_width=w, threads=1, device="cpu", roofline_seconds=0, **sw))
    key = f"{model}/{name}/{rep}"
    out[key] = {"cpu": r["cpu_seconds_per_step"], "wall": r["seconds_per_step"], "total": time.perf_counter() - t0,
                "first": r["first_step_seconds"], "compile_seconds": r["compile_seconds"]}
    print(key, json.dumps(out[key]), flush=True)
for model, ds, w in cases:
    for rep in range(3):
        for name, sw in variants.items():
            run(model, ds, w, name, sw, rep)
json.dump(out, open("/tmp/speedm/result2.json", "w"), indent=1)
run("smallcnn-pooled", "fake:3x32x32:10", 0.07, "compile", {"compile": True}, 0)
run("smallcnn-pooled", "fake:3x32x32:10", 0.07, "both", {"compile": True, "channels_last": True}, 0)
json.dump(out, open("/tmp/speedm/result2.json", "w"), indent=1)
