"""The daemon, in rooms: config/, devices/, planning/ (pure), ledger/ (persisted state), models/
(the supervisor and its parts), traffic/ (the router's lanes and control); at the top the
reconciler, the controller (the admin API's facade), runtime (the one place that wires), and the
leaves every room shares: leases, events, errors, units."""
