// Cited answers from your documents: search the server's RAG store, then ask it a question.
//
//   forge rag add notes/ --db notes.db              # ingest a folder of .txt/.md/.html/.pdf
//   forge serve smollm2 --db notes.db --api-key sk-local
//   FORGE_BASE_URL=http://127.0.0.1:8000 FORGE_API_KEY=sk-local node examples/rag.js "When is the launch?"

import { Forge } from "forge-llm";

const question = process.argv[2] ?? "What do these documents say?";
const app = new Forge();

console.log(`search: ${question}`);
for (const hit of await app.rag.query(question, { k: 2 })) {
  console.log(`  ${hit.score.toFixed(3)}  ${hit.source}: ${hit.text.slice(0, 70).replace(/\s+/g, " ")}`);
}

// The server grounds the chat in its store: by default the answer quotes a source and cites it as [n].
const { answer, sources } = await app.rag.answer(question, { maxTokens: 64 });
console.log(`answer: ${answer}`);
for (const source of sources) console.log(`  [${source.number}] ${source.source}`);
