// A service written in Java with the standard PostgreSQL JDBC driver and no knowledge
// of reconciler: it writes business rows in plain SQL, and the capture triggers make
// them replicated changes. Used by tests/integration/test_capture_clients.py.
//
// Usage: java -cp <driver jar> CaptureClient.java JDBC_URL REGION OPERATIONS SEED ORDER_KEYS SKUS
// Prints one JSON document: what this client committed (counter deltas, set elements
// added and removed, statuses written), from which the test computes its oracle.
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;

public class CaptureClient {
    interface Op { int run(Connection c) throws SQLException; }

    static int exec(Connection c, String sql, Object... args) throws SQLException {
        try (PreparedStatement st = c.prepareStatement(sql)) {
            for (int i = 0; i < args.length; i++) st.setObject(i + 1, args[i]);
            return st.executeUpdate();
        }
    }

    /** Runs op in its own transaction, again after a deadlock or serialization failure. */
    static int commit(Connection c, Op op) throws SQLException {
        for (int attempt = 1; ; attempt++) {
            try {
                int n = op.run(c);
                c.commit();
                return n;
            } catch (SQLException e) {
                c.rollback();
                String state = e.getSQLState();
                boolean retry = "40001".equals(state) || "40P01".equals(state);
                if (!retry || attempt >= 50) throw e;
            }
        }
    }

    static String json(String s) { return "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\""; }

    public static void main(String[] a) throws Exception {
        String url = a[0], region = a[1];
        int operations = Integer.parseInt(a[2]);
        Random random = new Random(Long.parseLong(a[3]));
        int orderKeys = Integer.parseInt(a[4]), skus = Integer.parseInt(a[5]);
        Map<String, Integer> deltas = new LinkedHashMap<>();
        Map<String, List<String>> added = new LinkedHashMap<>(), removed = new LinkedHashMap<>();
        Map<String, List<String>> live = new LinkedHashMap<>();
        List<String> statuses = new ArrayList<>();
        int committed = 0;
        try (Connection c = DriverManager.getConnection(url)) {
            c.setAutoCommit(false);
            for (int n = 0; n < operations; n++) {
                final long step = n;
                int pick = random.nextInt(100);
                String order = "o-" + (1 + random.nextInt(orderKeys));
                String sku = "sku-" + (1 + random.nextInt(skus));
                if (pick < 30) {
                    String status = "java-" + region + "-" + n;
                    commit(c, x -> exec(x, "INSERT INTO orders (id, customer, status, total_cents) VALUES (?, 'java', ?, ?)"
                            + " ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, total_cents = EXCLUDED.total_cents",
                            order, status, step));
                    statuses.add(status);
                } else if (pick < 40) {
                    commit(c, x -> exec(x, "DELETE FROM orders WHERE id = ?", order));
                } else if (pick < 65) {
                    if (commit(c, x -> exec(x, "UPDATE inventory SET stock = stock + 2 WHERE sku = ?", sku)) == 1) {
                        deltas.merge(sku, 2, Integer::sum);
                    }
                } else if (pick < 85 || live.getOrDefault(sku, List.of()).isEmpty()) {
                    String element = "j-" + region + "-" + n;
                    if (commit(c, x -> exec(x, "UPDATE inventory SET tags = tags || to_jsonb(?::text) WHERE sku = ?",
                            element, sku)) == 1) {
                        added.computeIfAbsent(sku, k -> new ArrayList<>()).add(element);
                        live.computeIfAbsent(sku, k -> new ArrayList<>()).add(element);
                    }
                } else {
                    List<String> mine = live.get(sku);
                    String element = mine.remove(random.nextInt(mine.size()));
                    if (commit(c, x -> exec(x, "UPDATE inventory SET tags = tags - ? WHERE sku = ?", element, sku)) == 1) {
                        removed.computeIfAbsent(sku, k -> new ArrayList<>()).add(element);
                    }
                }
                committed++;
            }
        }
        StringBuilder out = new StringBuilder("{\"committed\": " + committed + ", \"deltas\": {");
        String sep = "";
        for (Map.Entry<String, Integer> e : deltas.entrySet()) {
            out.append(sep).append(json(e.getKey())).append(": ").append(e.getValue());
            sep = ", ";
        }
        out.append("}");
        for (Map.Entry<String, Map<String, List<String>>> part : Map.of("added", added, "removed", removed).entrySet()) {
            out.append(", ").append(json(part.getKey())).append(": {");
            sep = "";
            for (Map.Entry<String, List<String>> e : part.getValue().entrySet()) {
                out.append(sep).append(json(e.getKey())).append(": [");
                String inner = "";
                for (String s : e.getValue()) { out.append(inner).append(json(s)); inner = ", "; }
                out.append("]");
                sep = ", ";
            }
            out.append("}");
        }
        out.append(", \"statuses\": [");
        sep = "";
        for (String s : statuses) { out.append(sep).append(json(s)); sep = ", "; }
        out.append("]}");
        System.out.println(out);
    }
}
