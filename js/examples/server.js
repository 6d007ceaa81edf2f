// A web server that relays a Forge stream to the browser: plain Node HTTP, server-sent events.
//
//   forge serve smollm2 --api-key sk-local          # the model, in another terminal
//   FORGE_BASE_URL=http://127.0.0.1:8000 FORGE_API_KEY=sk-local node examples/server.js
//   open http://127.0.0.1:3000/                     # PORT sets the port (0: any free one)
//
// The API key stays on this server; the page only talks to it. When the page goes away mid-answer, the
// AbortSignal cancels the request, and `forge serve` stops generating.

import { createServer } from "node:http";

import { Forge, logger } from "forge-llm";

const OPTIONS = { maxTokens: 48, temperature: 0 };

const PAGE = `<!doctype html>
<meta charset="utf-8"><title>Forge</title>
<form><input name="prompt" value="Once upon a time" size="40"> <button>Generate</button></form>
<pre id="out"></pre>
<script>
  document.querySelector("form").onsubmit = (event) => {
    event.preventDefault();
    const out = document.querySelector("#out");
    out.textContent = "";
    const prompt = new FormData(event.target).get("prompt");
    const source = new EventSource("/generate?prompt=" + encodeURIComponent(prompt));
    source.onmessage = (e) => (out.textContent += JSON.parse(e.data).text);
    source.addEventListener("done", () => source.close());
    source.addEventListener("failed", (e) => { out.textContent += "\\n[" + JSON.parse(e.data).message + "]"; source.close(); });
  };
</script>`;

const app = new Forge().use(logger());

async function relay(prompt, request, response) {
  const abort = new AbortController();
  response.once("close", () => response.writableFinished || abort.abort()); // the page left: stop the model
  response.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
  try {
    for await (const piece of app.stream(prompt, { ...OPTIONS, signal: abort.signal })) {
      response.write(`data: ${JSON.stringify({ text: piece })}\n\n`);
    }
    response.end("event: done\ndata: {}\n\n");
  } catch (error) {
    if (!abort.signal.aborted) response.end(`event: failed\ndata: ${JSON.stringify({ message: error.message })}\n\n`);
  }
}

const server = createServer((request, response) => {
  const url = new URL(request.url, "http://localhost");
  if (url.pathname === "/generate")
    return relay(url.searchParams.get("prompt") || "Once upon a time", request, response);
  if (url.pathname === "/") return response.writeHead(200, { "Content-Type": "text/html" }).end(PAGE);
  response.writeHead(404).end("not found");
});

server.listen(Number(process.env.PORT ?? 3000), "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}/`);
});
