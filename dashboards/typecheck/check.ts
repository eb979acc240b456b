// Type-checks the generated dashboard against the Dashboard type that Grafana publishes
// in @grafana/schema (pinned to the Grafana release the generator targets).
import type { Dashboard } from '@grafana/schema';
import dashboard from '../flask-contexts.json' with { type: 'json' };

// TypeScript types an imported JSON file with every string widened to `string` and every
// number to `number`, so a field typed as an enum ('absolute' | 'percentage') could never
// accept it. Widen the schema the same way: the check still catches a missing required
// field, a misspelt nesting level, or a number where a string or array belongs.
type Widen<T> = T extends string
  ? string
  : T extends number
    ? number
    : T extends boolean
      ? boolean
      : T extends ReadonlyArray<infer U>
        ? Array<Widen<U>>
        : T extends object
          ? { [K in keyof T]: Widen<T[K]> }
          : T;

const checked: Widen<Dashboard> = dashboard;
export default checked;
