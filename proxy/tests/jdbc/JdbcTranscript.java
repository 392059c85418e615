// A pgjdbc client (blocking sockets, Debian's libpostgresql-jdbc-java) that prints a
// transcript of what it saw: proxy/tests/jdbc.rs compares the transcript through each
// forwarding path with the one of a direct connection. Nothing that differs between runs
// (pids, ports, times) is printed.
//
// Usage: java -cp postgresql.jar:DIR JdbcTranscript HOST PORT DIRECT_PORT
// DIRECT_PORT is PostgreSQL's own port, used only to end this client's backend from outside.

import java.sql.*;
import java.util.Properties;

public class JdbcTranscript {
    static void say(String s) { System.out.println(s); }

    static Connection open(String host, int port, boolean ssl) throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", "postgres");
        p.setProperty("sslmode", ssl ? "require" : "disable");
        p.setProperty("socketTimeout", "20");
        p.setProperty("connectTimeout", "10");
        return DriverManager.getConnection("jdbc:postgresql://" + host + ":" + port + "/postgres", p);
    }

    static String state(SQLException e) { return e.getSQLState(); }

    public static void main(String[] args) throws Exception {
        String host = args[0];
        int port = Integer.parseInt(args[1]);
        int direct = Integer.parseInt(args[2]);
        boolean ssl = args.length > 3 && args[3].equals("ssl");
        try (Connection c = open(host, port, ssl)) {
            try (Statement s = c.createStatement()) {
                ResultSet r = s.executeQuery("select 1 + 1, 'tendril'::text, ssl from pg_stat_ssl where pid = pg_backend_pid()");
                r.next();
                say("simple " + r.getInt(1) + " " + r.getString(2) + " ssl=" + r.getBoolean(3));
            }
            // Prepared statements: server-side after prepareThreshold uses.
            try (PreparedStatement ps = c.prepareStatement("select ?::int * 2, repeat('x', ?::int)")) {
                long sum = 0;
                for (int i = 0; i < 10; i++) {
                    ps.setInt(1, i * 100);
                    ps.setInt(2, i * 100);
                    ResultSet r = ps.executeQuery();
                    r.next();
                    sum += r.getInt(1) + r.getString(2).length();
                }
                say("prepared " + sum);
            }
            // A large result, read in full, then through a cursor in batches.
            try (Statement s = c.createStatement()) {
                ResultSet r = s.executeQuery("select g, md5(g::text) from generate_series(1, 200000) g");
                long n = 0, h = 0;
                while (r.next()) { n++; h = h * 31 + r.getString(2).hashCode(); }
                say("large " + n + " " + h);
            }
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.setFetchSize(1000);
                ResultSet r = s.executeQuery("select g from generate_series(1, 50000) g");
                long sum = 0;
                while (r.next()) sum += r.getLong(1);
                say("cursor " + sum);
            }
            c.commit();
            // A transaction rolled back, an error inside one, and the session still usable.
            try (Statement s = c.createStatement()) {
                s.execute("create temp table t (i int primary key)");
                s.execute("insert into t values (1)");
                c.rollback();
                try {
                    s.execute("select 1 / 0");
                } catch (SQLException e) {
                    say("error " + state(e));
                }
                c.rollback();
                s.execute("create temp table t (i int primary key)");
                s.execute("insert into t select generate_series(1, 1000)");
                try {
                    s.execute("insert into t values (5)");
                } catch (SQLException e) {
                    say("duplicate " + state(e));
                }
                c.rollback();
            }
            c.setAutoCommit(true);
            // COPY both ways.
            org.postgresql.copy.CopyManager copy = c.unwrap(org.postgresql.PGConnection.class).getCopyAPI();
            try (Statement s = c.createStatement()) {
                s.execute("create temp table c (i int, s text)");
            }
            StringBuilder in = new StringBuilder();
            for (int i = 0; i < 50000; i++) in.append(i).append('\t').append("row ").append(i).append('\n');
            long copied = copy.copyIn("copy c from stdin", new java.io.StringReader(in.toString()));
            java.io.StringWriter out = new java.io.StringWriter();
            long back = copy.copyOut("copy c to stdout", out);
            say("copy " + copied + " " + back + " " + out.toString().hashCode());
            // Notices and a notification to itself.
            try (Statement s = c.createStatement()) {
                s.execute("listen tendril");
                s.execute("notify tendril, 'hello'");
                s.execute("select 1");
                org.postgresql.PGNotification[] n = c.unwrap(org.postgresql.PGConnection.class).getNotifications(2000);
                say("notify " + (n == null ? 0 : n.length) + " " + (n == null || n.length == 0 ? "" : n[0].getParameter()));
            }
            // The backend ended from outside (pg_terminate_backend): the next statement fails
            // at once with the server's reason, it does not hang.
            int pid;
            try (Statement s = c.createStatement()) {
                ResultSet r = s.executeQuery("select pg_backend_pid()");
                r.next();
                pid = r.getInt(1);
            }
            try (Connection admin = open(host, direct, false); Statement s = admin.createStatement()) {
                s.execute("select pg_terminate_backend(" + pid + ")");
            }
            Thread.sleep(300);
            long started = System.nanoTime();
            try (Statement s = c.createStatement()) {
                s.execute("select 1");
                say("terminated: no error");
            } catch (SQLException e) {
                long ms = (System.nanoTime() - started) / 1_000_000;
                say("terminated " + state(e) + (ms < 5000 ? " at once" : " after " + ms + " ms"));
            }
        }
    }
}
