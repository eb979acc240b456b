// Type-checks the generated dashboard against the Dashboard type that Grafana publishes
// in @grafana/schema (pinned to the Grafana release the generator targets).
//
// run.sh writes dashboard.gen.ts: the dashboard JSON as an object literal assigned to
// Literals<Dashboard>. Not an `import ... with { type: 'json' }`: TypeScript widens every
// string of an imported JSON file to `string`, so a misspelt panel type or threshold
// mode would pass. An object literal keeps its string literals, and is checked for
// unknown keys too.
import type { Dashboard } from '@grafana/schema';

// Grafana's TypeScript enums (ThresholdsMode, VariableRefresh...) are nominal: no string
// literal is assignable to them, though JSON can only hold the literal. `${E}` turns an
// enum into the union of its values ('absolute' | 'percentage'), and leaves a union of
// literals ('timeseries' | ...) and plain `string` as they are.
// A query (anything with a refId) is a DataQuery that each data source extends with its
// own fields (Prometheus: expr, legendFormat, ...): those may be added.
export type Literals<T> = T extends string
  ? `${T}`
  : T extends ReadonlyArray<infer U>
    ? Array<Literals<U>>
    : T extends { refId: string }
      ? { [K in keyof T]: Literals<T[K]> } & Record<string, unknown>
      : T extends object
        ? { [K in keyof T]: Literals<T[K]> }
        : T;

export type CheckedDashboard = Literals<Dashboard>;
