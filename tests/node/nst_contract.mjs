// Calls a running nst-server from Node.js with @grpc/grpc-js, the API loaded at run time from
// proto/nst/v1/style_transfer.proto by @grpc/proto-loader (no generated code), and prints one JSON object.
//
//   node nst_contract.mjs stylize --target HOST:PORT --content C.png --style S.png [--side 64] [--iterations 3]
//                                 [--out RESULT.png]
//     GetModelInfo, then one Stylize job read to its end: the events in order, the result PNG reassembled from
//     ImageChunk messages (or taken from Result.image_png) and its IHDR width and height.
//   node nst_contract.mjs invalid --target HOST:PORT --content C.png --style S.png
//     Requests the server refuses (max_side_px one over its limit, a NaN and a negative weight): each one's gRPC
//     code and message, and the google.rpc.Status / google.rpc.BadRequest decoded from the
//     grpc-status-details-bin trailer.
//
// Exits 0 once it has printed its JSON (the caller judges it), 1 on an unexpected failure (a JSON "error" too),
// 2 on a usage error. tests/test_node.py runs it against a real server.

import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const PROTO_ROOT = resolve(HERE, '..', '..', 'proto');
const DEADLINE_MS = 120_000;
const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

/** The nst.v1.StyleTransfer client class, from the .proto file as it is. */
function loadService(protoRoot) {
  const definition = protoLoader.loadSync('nst/v1/style_transfer.proto', {
    includeDirs: [protoRoot],
    keepCase: true,      // field names as in the .proto: max_side_px, image_chunk, …
    longs: String,       // uint64 (seed, offset, total_bytes) as decimal strings: no precision lost
    enums: String,       // enum values by name: "STOP_REASON_ITERATIONS_DONE"
    defaults: true,
    oneofs: true,        // StylizeResponse.event names the oneof member that is set
  });
  return grpc.loadPackageDefinition(definition).nst.v1.StyleTransfer;
}

/** google.rpc.Status and google.rpc.BadRequest (tests/node/google_rpc.proto), for the error details. */
function loadRpcTypes() {
  const root = new protobuf.Root().loadSync(join(HERE, 'google_rpc.proto'), { keepCase: true });
  return { root, Status: root.lookupType('google.rpc.Status') };
}

function unary(client, method, request) {
  return new Promise((resolveCall, reject) => {
    client[method](request, { deadline: Date.now() + DEADLINE_MS }, (error, response) =>
      (error ? reject(error) : resolveCall(response)));
  });
}

/** Reads a server stream to its end: every message, and the final status (or the error that ended it). */
function readStream(call) {
  return new Promise((resolveCall) => {
    const messages = [];
    let error = null;
    call.on('data', (message) => messages.push(message));
    call.on('error', (e) => { error = e; });
    call.on('status', (status) => resolveCall({ messages, error, status }));
  });
}

/** Width and height from a PNG's IHDR chunk (bytes 16..23), or null when the bytes are no PNG. */
function pngSize(png) {
  if (png.length < 24 || !png.subarray(0, 8).equals(PNG_SIGNATURE) || png.toString('latin1', 12, 16) !== 'IHDR') {
    return null;
  }
  return { width: png.readUInt32BE(16), height: png.readUInt32BE(20) };
}

function modelSummary(info) {
  return {
    min_side_px: info.min_side_px, max_side_px: info.max_side_px, max_iterations: info.max_iterations,
    replica: info.replica, heartbeat_s: info.heartbeat_s, output_layers: info.output_layers,
  };
}

async function stylize(client, args) {
  const info = await unary(client, 'GetModelInfo', {});
  const request = {
    content_image: readFileSync(args.content), style_image: readFileSync(args.style),
    max_side_px: Number(args.side), iterations: Number(args.iterations), scales: 1, seed: 0,
  };
  const { messages, error, status } = await readStream(
    client.Stylize(request, { deadline: Date.now() + DEADLINE_MS }));

  const events = messages.map((m) => m.event);
  const counts = {};
  for (const event of events) counts[event] = (counts[event] || 0) + 1;
  const progress = messages.filter((m) => m.event === 'progress').map((m) => m.progress.iteration);
  const problems = [];
  if (events[0] !== 'accepted') problems.push(`first event is ${events[0]}, not accepted`);
  if (events.at(-1) !== 'result') problems.push(`last event is ${events.at(-1)}, not result`);
  if (counts.accepted !== 1 || counts.result !== 1) problems.push(`accepted x${counts.accepted}, result x${counts.result}`);
  if (progress.some((it, i) => i > 0 && it <= progress[i - 1])) problems.push('progress iterations not increasing');

  // The result PNG: ImageChunk pieces right before the Result (then Result.image_png is empty), else the Result's.
  const pieces = [];
  let assembled = 0;
  let totalBytes = null;
  for (const message of messages) {
    if (message.event !== 'image_chunk') continue;
    const chunk = message.image_chunk;
    if (Number(chunk.offset) !== assembled) problems.push(`chunk at offset ${chunk.offset}, expected ${assembled}`);
    totalBytes = Number(chunk.total_bytes);
    pieces.push(chunk.data);
    assembled += chunk.data.length;
  }
  const resultMessage = messages.find((m) => m.event === 'result');
  const result = resultMessage ? resultMessage.result : null;
  let png = Buffer.alloc(0);
  if (result && result.image_png.length > 0) {
    if (pieces.length) problems.push('both ImageChunk messages and Result.image_png');
    png = result.image_png;
  } else if (pieces.length) {
    png = Buffer.concat(pieces);
    if (png.length !== totalBytes) problems.push(`chunks give ${png.length} bytes of total_bytes ${totalBytes}`);
  }
  const size = pngSize(png);
  if (args.out && png.length) writeFileSync(args.out, png);

  return {
    command: 'stylize',
    model: modelSummary(info),
    request: { max_side_px: request.max_side_px, iterations: request.iterations, scales: 1 },
    status: { code: status.code, name: grpc.status[status.code], details: status.details },
    error: error ? { code: error.code, details: error.details } : null,
    job_id: counts.accepted ? messages[0].accepted.job_id : null,
    events: counts,
    progress_iterations: progress,
    result: result && {
      width_px: result.width_px, height_px: result.height_px, iterations: result.iterations,
      best_iteration: result.best_iteration, stop_reason: result.stop_reason, precision: result.precision,
      costs: result.costs, elapsed_ms: result.elapsed_ms,
    },
    png: {
      bytes: png.length, from_chunks: pieces.length, is_png: size !== null,
      ihdr_width: size && size.width, ihdr_height: size && size.height,
    },
    problems,
  };
}

/** google.rpc.Status from the grpc-status-details-bin trailer, its Any details unpacked where known. */
function richStatus(error, rpc) {
  const values = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!values.length) return null;
  const status = rpc.Status.decode(values[0]);
  const details = status.details.map((any) => {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = rpc.root.lookup(typeName);
    if (!(type instanceof protobuf.Type)) return { type: typeName };
    const decoded = type.toObject(type.decode(any.value), { defaults: true });
    return { type: typeName, ...decoded };
  });
  return { code: status.code, message: status.message, details };
}

async function invalid(client, args) {
  const info = await unary(client, 'GetModelInfo', {});
  const rpc = loadRpcTypes();
  const base = {
    content_image: readFileSync(args.content), style_image: readFileSync(args.style),
    max_side_px: 32, iterations: 1, scales: 1,
  };
  const cases = [
    { name: 'max_side_px_over_limit', change: { max_side_px: info.max_side_px + 1 } },
    { name: 'style_weight_nan', change: { style_weight: NaN } },
    { name: 'content_weight_negative', change: { content_weight: -1 } },
  ];
  const results = [];
  for (const { name, change } of cases) {
    const { messages, error, status } = await readStream(
      client.Stylize({ ...base, ...change }, { deadline: Date.now() + DEADLINE_MS }));
    const rich = error ? richStatus(error, rpc) : null;
    results.push({
      name,
      change: Object.fromEntries(Object.entries(change).map(([k, v]) => [k, String(v)])),
      messages: messages.length,
      code: status.code,
      code_name: grpc.status[status.code],
      details: status.details,
      rich_status: rich,
      field_violations: rich
        ? rich.details.filter((d) => d.type === 'google.rpc.BadRequest').flatMap((d) => d.field_violations)
            .map(({ field, description }) => ({ field, description }))
        : [],
    });
  }
  return { command: 'invalid', model: modelSummary(info), cases: results };
}

async function main() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        target: { type: 'string' }, content: { type: 'string' }, style: { type: 'string' },
        side: { type: 'string', default: '64' }, iterations: { type: 'string', default: '3' },
        out: { type: 'string' }, proto: { type: 'string', default: PROTO_ROOT },
      },
    });
  } catch (e) {
    console.error(e.message);
    return 2;
  }
  const { values: args, positionals } = parsed;
  const command = positionals[0];
  if (!['stylize', 'invalid'].includes(command) || !args.target || !args.content || !args.style) {
    console.error('usage: node nst_contract.mjs stylize|invalid --target HOST:PORT --content C.png --style S.png '
                  + '[--side PX] [--iterations N] [--out RESULT.png] [--proto PROTO_ROOT]');
    return 2;
  }
  const StyleTransfer = loadService(args.proto);
  const client = new StyleTransfer(args.target, grpc.credentials.createInsecure());
  try {
    const summary = command === 'stylize' ? await stylize(client, args) : await invalid(client, args);
    console.log(JSON.stringify(summary));
    return 0;
  } catch (e) {
    console.log(JSON.stringify({ command, error: { code: e.code ?? null, message: String(e.message ?? e) } }));
    return 1;
  } finally {
    client.close();
  }
}

process.exitCode = await main();
