"""Tokens/s of Forge's web export in headless Chromium against transformers.js on the same ONNX files.

Both run in one browser session per provider (WASM, then WebGPU), on the folder `forge export --format web`
wrote: Forge's forge-web.js on onnxruntime-web, transformers.js (@huggingface/transformers, which bundles its
own onnxruntime-web) through ``AutoModelForCausalLM.from_pretrained(folder)``. Each generates greedily from the
same prompt ids; each timing is one warm-up run, then the best of ``--repeats`` rounds that alternate which
engine goes first. Speed is generated tokens over the whole generation's time (prefill included). Without a
GPU, Chromium's WebGPU is SwiftShader (CPU emulation): its figures check that the path works, not how fast a
GPU is.

    python benchmarks/web.py --model smollm2                   # SmolLM2-135M, int8 (the web export's default)
    python benchmarks/web.py --model runs/tiny --tokens 64     # any checkpoint; --folder DIR: an export
    python benchmarks/web.py --folder smol-web --providers webgpu --tokens 8 --repeats 1   # SwiftShader is slow

Needs Chromium (/usr/bin/chromium) and tests/web's npm packages (`npm ci --ignore-scripts` in tests/web).
Saves benchmarks/results/web_smollm2_cpu.json for SmolLM2 (by --model or the folder's name), else web_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from _common import ROOT, environment, save_result
from forge import models
from forge.web import default_web_dtype, export_web
from forge.web.serve import Isolated

sys.path.insert(0, str(ROOT / "tests" / "web"))
from web_helpers import ORT, browse, serving

NPM = ROOT / "tests" / "web" / "node_modules"
TJS = NPM / "@huggingface" / "transformers"
PROMPT = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer"
JS_DTYPES = {"float32": "fp32", "int8": "q8", "int4": "q4"}

# Both engines in the page, loaded side by side: a warm-up run of each, then `repeats` rounds that alternate
# which engine goes first, so that a host that slows down mid-run weighs on both. Each engine's best round counts.
_BENCH = """async ({ provider, tokens, repeats, dtype, threads }) => {
  const { load } = await import("/model/forge-web.js");
  const forge = await load("/model/", { provider, threads });
  const ids = forge.encodePrompt(%(prompt)s);
  const tjs = await import("/tjs/transformers.js");
  tjs.env.allowRemoteModels = false;
  tjs.env.allowLocalModels = true;
  tjs.env.localModelPath = "/";
  tjs.env.backends.onnx.wasm.wasmPaths = "/tjs-ort/";
  if (threads) tjs.env.backends.onnx.wasm.numThreads = threads;
  const model = await tjs.AutoModelForCausalLM.from_pretrained("model", { device: provider, dtype });
  const input = new tjs.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, ids.length]);
  const engines = {
    forge: () => forge.complete(ids, { maxTokens: tokens }),
    transformers_js: async () => {
      const out = await model.generate({ input_ids: input, max_new_tokens: tokens, do_sample: false });
      return Array.from(out.data.slice(ids.length), Number);
    },
  };
  const runs = { forge: [], transformers_js: [] };
  const outs = {};
  const once = async (name) => {
    const t = performance.now();
    outs[name] = await engines[name]();
    return (performance.now() - t) / 1000;
  };
  for (const name of Object.keys(engines)) await once(name);  // warm-up
  for (let i = 0; i < repeats; i++) {
    const order = i %% 2 ? ["transformers_js", "forge"] : ["forge", "transformers_js"];
    for (const name of order) runs[name].push(await once(name));
  }
  const result = { provider: forge.provider, prompt_tokens: ids.length };
  for (const name of Object.keys(engines)) {
    const best = Math.min(...runs[name]);
    result[name] = { seconds: best, runs_s: runs[name], tokens: outs[name], tokens_per_s: outs[name].length / best };
  }
  return result;
}"""


def _app(folder: Path, page: Path) -> Isolated:
    nested = TJS / "node_modules" / "onnxruntime-web" / "dist"
    return Isolated(
        Starlette(
            routes=[
                Mount("/model", StaticFiles(directory=folder)),
                Mount("/tjs-ort", StaticFiles(directory=nested if nested.is_dir() else ORT / "dist")),
                Mount("/tjs", StaticFiles(directory=TJS / "dist")),
                Mount("/", StaticFiles(directory=page, html=True)),
            ]
        )
    )


def _folder(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    if args.folder:
        return Path(args.folder), json.loads((Path(args.folder) / "web.json").read_text())["dtype"]
    loaded = models.load(args.model)
    dtype = args.dtype or default_web_dtype(loaded.model)
    folder = export_web(loaded.model, loaded.tokenizer, work / "web", dtype=dtype, onnxruntime_web=ORT)
    return folder, dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="A checkpoint or known name to export (default: smollm2).")
    parser.add_argument("--folder", help="A web folder exported already.")
    parser.add_argument("--dtype", choices=list(JS_DTYPES), help="Export dtype (default: the web export's).")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="WASM threads for both engines (0: their default).")
    parser.add_argument("--providers", default="wasm,webgpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder, dtype = _folder(args, work)
        page = work / "page"
        page.mkdir()
        (page / "index.html").write_text("<!doctype html><script>window.forgeReady = Promise.resolve();</script>")
        bench = _BENCH % {"prompt": json.dumps(PROMPT)}
        runs = {}
        with serving(_app(folder, page)) as url:
            for provider in args.providers.split(","):
                arg = {"provider": provider, "tokens": args.tokens, "repeats": args.repeats}
                arg |= {"dtype": JS_DTYPES[dtype], "threads": args.threads or None}
                (result,) = browse(url, [{"evaluate": bench, "arg": arg}], timeout=3600)
                result["speedup"] = result["forge"]["tokens_per_s"] / result["transformers_js"]["tokens_per_s"]
                result["same_tokens"] = result["forge"]["tokens"] == result["transformers_js"]["tokens"]
                for engine in ("forge", "transformers_js"):
                    result[engine]["tokens"] = len(result[engine]["tokens"])
                runs[provider] = result
        manifest = json.loads((folder / "web.json").read_text())
    smollm2 = args.model == "smollm2" if not args.folder else manifest["name"] == "smollm2"
    out = {
        "benchmark": "web",
        "model": args.folder or args.model,
        "dtype": dtype,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "wasm_threads": args.threads or "default",
        "onnxruntime_web": manifest["onnxruntime_web"]["version"],
        "transformers_js": json.loads((TJS / "package.json").read_text())["version"],
        "browser": "headless Chromium, WebGPU = SwiftShader (CPU emulation) without a GPU",
        "runs": runs,
        "environment": environment(torch.device("cpu")),
    }
    save_result("web_smollm2_cpu" if smollm2 else "web_cpu", out)


if __name__ == "__main__":
    main()
