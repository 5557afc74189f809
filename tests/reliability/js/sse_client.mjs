// One EventSource (the npm eventsource package) on the URL given; prints one JSON line per
// event: {"open": true} when a connection opens, {"id", "data"} per message, {"error"} per
// error (the client reconnects by itself, sending Last-Event-ID). Exits after COUNT messages.
import { EventSource } from "eventsource";

const [url, count] = process.argv.slice(2);
const source = new EventSource(url);
let seen = 0;
const say = (line) => process.stdout.write(JSON.stringify(line) + "\n");
source.addEventListener("open", () => say({ open: true }));
source.addEventListener("error", (event) => say({ error: String(event.message ?? event.type) }));
source.addEventListener("message", (event) => {
  say({ id: event.lastEventId, data: event.data });
  seen += 1;
  if (seen >= Number(count)) {
    source.close();
    process.exit(0);
  }
});
