// Validates prometheus-operator objects (ServiceMonitor, PrometheusRule, ...) offline against the
// JSON schemas of @kubernetes-models/prometheus-operator (generated from the operator's Go types).
//
//   node validate_prometheus_operator.mjs <node_modules dir>  < objects.json
//
// stdin: a JSON array of objects. stdout: a JSON array, one {kind, name, ok, error} per object.
// Exit status: 0 all valid, 1 some invalid, 2 usage or load error.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modulesDir = process.argv[2];
if (!modulesDir) {
  console.error("usage: validate_prometheus_operator.mjs <node_modules dir> < objects.json");
  process.exit(2);
}
let models;
try {
  const entry = join(modulesDir, "@kubernetes-models", "prometheus-operator",
    "monitoring.coreos.com", "v1", "index.js");
  models = await import(pathToFileURL(entry).href);
} catch (err) {
  console.error(`cannot load @kubernetes-models/prometheus-operator: ${err}`);
  process.exit(2);
}

const objects = JSON.parse(readFileSync(0, "utf8"));
const results = objects.map((obj) => {
  const kind = obj?.kind;
  const name = obj?.metadata?.name;
  const Model = models[kind];
  if (obj?.apiVersion !== "monitoring.coreos.com/v1" || typeof Model !== "function") {
    return { kind, name, ok: false, error: `no model for ${obj?.apiVersion} ${kind}` };
  }
  try {
    new Model(obj).validate();
    return { kind, name, ok: true, error: null };
  } catch (err) {
    const details = err?.details ? ` ${JSON.stringify(err.details)}` : "";
    return { kind, name, ok: false, error: `${err?.message ?? err}${details}` };
  }
});
console.log(JSON.stringify(results));
process.exit(results.every((r) => r.ok) ? 0 : 1);
