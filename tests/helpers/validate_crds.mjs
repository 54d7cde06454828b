// Validates Prometheus Operator objects (PodMonitor, PrometheusRule, ...) read as a JSON list
// from stdin against the CRD schemas that @kubernetes-models/prometheus-operator carries.
// Prints one line per invalid object; exits 1 if any.
import * as models from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = 0;
for (const object of JSON.parse(input)) {
  const Model = models[object.kind];
  try {
    if (!Model) throw new Error(`no schema for kind ${object.kind}`);
    new Model(object).validate();
  } catch (error) {
    failed += 1;
    console.log(`${object.kind}/${object.metadata?.name}: ${error.message}`);
  }
}
process.exit(failed ? 1 : 0);
