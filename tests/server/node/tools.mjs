// Tool calls (whole and streamed) through the official openai npm client; the stream is read by
// the SDK's own accumulator (chat.completions.stream -> finalChatCompletion), which merges
// delta.tool_calls by index. Usage: node tools.mjs BASE_URL MODEL TOOLS_JSON. Prints one JSON line.
import OpenAI from "openai";

const [baseURL, model, toolsJson] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const request = { model, messages: [{ role: "user", content: "Hi" }], tools: JSON.parse(toolsJson) };

const whole = await client.chat.completions.create(request);
const stream = client.chat.completions.stream(request);
const streamed = await stream.finalChatCompletion();

const calls = (message) => (message.tool_calls ?? []).map((c) => ({
  id: c.id, type: c.type, name: c.function.name, arguments: c.function.arguments,
}));
console.log(JSON.stringify({
  content: whole.choices[0].message.content,
  finish_reason: whole.choices[0].finish_reason,
  calls: calls(whole.choices[0].message),
  stream_content: streamed.choices[0].message.content,
  stream_finish_reason: streamed.choices[0].finish_reason,
  stream_calls: calls(streamed.choices[0].message),
}));
