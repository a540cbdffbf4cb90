// A Node @livekit/agents 1.9.0 worker for tests/livekit/test_node_agent.py:
// `node agent.mjs start`, with LIVEKIT_URL pointing at trunkline.
//
// Each job appends a JSON line to env TL_EVENTS (`start`: its id, room,
// participant identity, and its assignment's URL and token; `end` when the job
// process is shut down, e.g. by a JobTermination), then holds forever without
// joining a room (there is no media server). The Node SDK never reports job
// status, so only trunkline (the webhook, a termination) can end the job.
import { appendFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { ServerOptions, cli, defineAgent } from '@livekit/agents';

const EVENTS = process.env.TL_EVENTS;

function record(fields) {
  appendFileSync(EVENTS, JSON.stringify({ tag: 'node', t: Date.now() / 1000, ...fields }) + '\n');
}

export default defineAgent({
  entry: async (ctx) => {
    const jobId = ctx.job.id;
    record({
      event: 'start',
      job_id: jobId,
      room: ctx.job.room?.name ?? '',
      identity: ctx.info.acceptArguments.identity,
      url: ctx.info.url,
      token: ctx.info.token,
    });
    ctx.addShutdownCallback(async () => record({ event: 'end', job_id: jobId }));
    await new Promise(() => {}); // never ends by itself
  },
});

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  cli.runApp(
    new ServerOptions({
      agent: fileURLToPath(import.meta.url),
      agentName: process.env.TL_AGENT_NAME ?? '',
      numIdleProcesses: 1,
      loadFunc: async () => 0,
      loadThreshold: 1.01,
    }),
  );
}
