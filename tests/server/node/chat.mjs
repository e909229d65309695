// Chat (whole and streamed) through the official openai npm client against a jaxserve server.
// Usage: node chat.mjs BASE_URL MODEL   (BASE_URL ends in /v1). Prints one JSON line of results.
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const messages = [{ role: "user", content: "hello from node" }];

const whole = await client.chat.completions.create({
  model, messages, max_tokens: 8, temperature: 0,
});

const stream = await client.chat.completions.create({
  model, messages, max_tokens: 8, temperature: 0, stream: true,
  stream_options: { include_usage: true },
});
let streamed = "";
let finishReason = null;
let usage = null;
let role = null;
for await (const chunk of stream) {
  if (chunk.usage) usage = chunk.usage;
  for (const choice of chunk.choices) {
    role = role ?? choice.delta.role ?? null;
    streamed += choice.delta.content ?? "";
    finishReason = choice.finish_reason ?? finishReason;
  }
}

let notFound = null;
try {
  await client.chat.completions.create({ model: "no-such-model", messages });
} catch (err) {
  notFound = err.status;
}

console.log(JSON.stringify({
  id: whole.id,
  object: whole.object,
  content: whole.choices[0].message.content,
  finish_reason: whole.choices[0].finish_reason,
  usage: whole.usage,
  streamed,
  stream_role: role,
  stream_finish_reason: finishReason,
  stream_usage: usage,
  not_found_status: notFound,
}));
