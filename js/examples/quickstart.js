// Quick start: the seed's quickstart in JavaScript, against `forge serve`: middleware, events, generate,
// stream, chat.
//
//   forge serve smollm2 --api-key sk-local          # in another terminal (or any model: runs/tiny, a GGUF)
//   FORGE_BASE_URL=http://127.0.0.1:8000 FORGE_API_KEY=sk-local node examples/quickstart.js

import { Forge, logger, timer } from "forge-llm";

const app = new Forge() // FORGE_BASE_URL and FORGE_API_KEY, else http://127.0.0.1:8000 without a key
  .use(logger()) // middleware, applied in order around every request
  .use(timer())
  .on("response", (e) => console.log(`  [${e.completionTokens} tokens, ${e.finishReason}, ${e.elapsed.toFixed(2)} s]`));

const text = await app.generate("Once upon a time", { maxTokens: 24, seed: 0 }); // async by default
console.log("generate:", JSON.stringify(text));

const pieces = [];
for await (const piece of app.stream("Once upon a time", { maxTokens: 24, seed: 0 })) pieces.push(piece);
console.log("stream:  ", JSON.stringify(pieces.join("")), `in ${pieces.length} pieces`);

const answer = await app.chat([{ role: "user", content: "What is the capital of France? Answer in one word." }], {
  maxTokens: 16,
  temperature: 0,
});
console.log("chat:    ", JSON.stringify(answer));
