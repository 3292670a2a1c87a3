#include "hostd/state_store.h"

#include <fmt/format.h>

namespace keel::hostd {

using nlohmann::json;

namespace {

// A prepared statement, finalized on scope exit.
class Statement {
public:
  Statement(sqlite3* db, const char* sql) : db_(db) { rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr); }
  ~Statement() { sqlite3_finalize(stmt_); }
  Result<void> ready() const {
    if (rc_ != SQLITE_OK) return fail(EIO, fmt::format("sqlite prepare: {}", sqlite3_errmsg(db_)));
    return ok();
  }
  void bind(int i, const std::string& s) { sqlite3_bind_text(stmt_, i, s.data(), static_cast<int>(s.size()), SQLITE_TRANSIENT); }
  void bind(int i, int64_t v) { sqlite3_bind_int64(stmt_, i, v); }
  // SQLITE_ROW, SQLITE_DONE or an error.
  int step() { return sqlite3_step(stmt_); }
  std::string text(int col) {
    auto p = sqlite3_column_text(stmt_, col);
    return p ? std::string(reinterpret_cast<const char*>(p), static_cast<size_t>(sqlite3_column_bytes(stmt_, col))) : std::string();
  }
  int64_t integer(int col) { return sqlite3_column_int64(stmt_, col); }
  Result<void> run() {
    TRY(ready());
    int rc = step();
    if (rc == SQLITE_CONSTRAINT) return fail(EEXIST, fmt::format("already exists ({})", sqlite3_errmsg(db_)));
    if (rc != SQLITE_DONE && rc != SQLITE_ROW) return fail(EIO, fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
    return ok();
  }

private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
};

json parse_stored(const std::string& s) {
  json j = json::parse(s, nullptr, false);
  return j.is_discarded() ? json::object() : j;
}

DomainRecord domain_row(Statement& st) {
  DomainRecord r;
  r.name = st.text(0);
  r.uuid = st.text(1);
  r.definition = parse_stored(st.text(2));
  r.pid = st.integer(3);
  r.state = st.text(4);
  r.live = parse_stored(st.text(5));
  return r;
}

}  // namespace

Result<std::unique_ptr<StateStore>> StateStore::open(const std::string& path) {
  sqlite3* db = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return fail(EIO, fmt::format("open state database {}: {}", path, msg));
  }
  std::unique_ptr<StateStore> s(new StateStore(db));
  sqlite3_busy_timeout(db, 5000);
  TRY(s->exec("PRAGMA journal_mode=WAL"));
  // In WAL mode NORMAL is durable across a process kill (what keeld must survive) and skips an fsync
  // per change; FULL would add safety against power loss at a few ms per define.
  TRY(s->exec("PRAGMA synchronous=NORMAL"));
  TRY(s->exec(R"(
    CREATE TABLE IF NOT EXISTS domains (
      name TEXT PRIMARY KEY,
      uuid TEXT NOT NULL UNIQUE,
      definition TEXT NOT NULL,
      pid INTEGER NOT NULL DEFAULT 0,
      state TEXT NOT NULL DEFAULT 'shutoff',
      live TEXT NOT NULL DEFAULT '{}');
    CREATE TABLE IF NOT EXISTS pools (
      name TEXT PRIMARY KEY,
      path TEXT NOT NULL UNIQUE,
      type TEXT NOT NULL DEFAULT 'dir');
    CREATE TABLE IF NOT EXISTS volumes (
      pool TEXT NOT NULL,
      name TEXT NOT NULL,
      format TEXT NOT NULL,
      PRIMARY KEY (pool, name));
    CREATE TABLE IF NOT EXISTS networks (
      name TEXT PRIMARY KEY,
      definition TEXT NOT NULL,
      active INTEGER NOT NULL DEFAULT 0);
  )"));
  return s;
}

StateStore::~StateStore() { sqlite3_close(db_); }

Result<void> StateStore::exec(const std::string& sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown";
    sqlite3_free(err);
    return fail(EIO, "sqlite: " + msg);
  }
  return ok();
}

Result<void> StateStore::insert_domain(const DomainRecord& r) {
  std::lock_guard lock(mutex_);
  Statement st(db_, "INSERT INTO domains (name, uuid, definition, pid, state, live) VALUES (?, ?, ?, ?, ?, ?)");
  st.bind(1, r.name);
  st.bind(2, r.uuid);
  st.bind(3, r.definition.dump());
  st.bind(4, r.pid);
  st.bind(5, r.state);
  st.bind(6, r.live.dump());
  return st.run();
}

Result<void> StateStore::update_domain(const DomainRecord& r) {
  std::lock_guard lock(mutex_);
  Statement st(db_, "UPDATE domains SET uuid = ?, definition = ?, pid = ?, state = ?, live = ? WHERE name = ?");
  st.bind(1, r.uuid);
  st.bind(2, r.definition.dump());
  st.bind(3, r.pid);
  st.bind(4, r.state);
  st.bind(5, r.live.dump());
  st.bind(6, r.name);
  TRY(st.run());
  if (sqlite3_changes(db_) != 1) return fail(ENOENT, fmt::format("domain '{}' not found", r.name));
  return ok();
}

Result<void> StateStore::delete_domain(const std::string& name) {
  std::lock_guard lock(mutex_);
  Statement st(db_, "DELETE FROM domains WHERE name = ?");
  st.bind(1, name);
  return st.run();
}

Result<void> StateStore::set_domain_state(const std::string& name, const std::string& state) {
  std::lock_guard lock(mutex_);
  Statement st(db_, "UPDATE domains SET state = ? WHERE name = ? AND pid != 0");
  st.bind(1, state);
  st.bind(2, name);
  return st.run();
}

Result<std::optional<DomainRecord>> StateStore::get_domain(const std::string& name) {
  std::lock_guard lock(mutex_);
  Statement st(db_, "SELECT name, uuid, definition, pid, state, live FROM domains WHERE name = ?");
  TRY(st.ready());
  st.bind(1, name);
  int rc = st.step();
  if (rc == SQLITE_ROW) return std::optional<DomainRecord>(domain_row(st));
  if (rc == SQLITE_DONE) return std::optional<DomainRecord>();
  return fail(EIO, fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
}

Result<std::vector<DomainRecord>> StateStore::list_domains() {
  std::lock_guard lock(mutex_);
  Statement st(db_, "SELECT name, uuid, definition, pid, state, live FROM domains ORDER BY name");
  TRY(st.ready());
  std::vector<DomainRecord> out;
  int rc;
  while ((rc = st.step()) == SQLITE_ROW) out.push_back(domain_row(st));
  if (rc != SQLITE_DONE) return fail(EIO, fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  return out;
}

Result<void> StateStore::insert_pool(const PoolRecord& r) {
  std::lock_guard lock(mutex_);
  Statement st(db_, "INSERT INTO pools (name, path, type) VALUES (?, ?, ?)");
  st.bind(1, r.name);
  st.bind(2, r.path);
  st.bind(3, r.type);
  return st.run();
}

Result<void> StateStore::delete_pool(const std::string& name) {
  std::lock_guard lock(mutex_);
  Statement forget(db_, "DELETE FROM volumes WHERE pool = ?");  // a pool defined again later starts afresh
  forget.bind(1, name);
  TRY(forget.run());
  Statement st(db_, "DELETE FROM pools WHERE name = ?");
  st.bind(1, name);
  return st.run();
}

Result<std::vector<PoolRecord>> StateStore::list_pools() {
  std::lock_guard lock(mutex_);
  Statement st(db_, "SELECT name, path, type FROM pools ORDER BY name");
  TRY(st.ready());
  std::vector<PoolRecord> out;
  int rc;
  while ((rc = st.step()) == SQLITE_ROW) out.push_back(PoolRecord{st.text(0), st.text(1), st.text(2)});
  if (rc != SQLITE_DONE) return fail(EIO, fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  return out;
}

Result<void> StateStore::set_volume_format(const std::string& pool, const std::string& volume,
                                          const std::string& format) {
  std::lock_guard lock(mutex_);
  Statement st(db_, "INSERT INTO volumes (pool, name, format) VALUES (?, ?, ?) "
                    "ON CONFLICT(pool, name) DO UPDATE SET format = excluded.format");
  st.bind(1, pool);
  st.bind(2, volume);
  st.bind(3, format);
  return st.run();
}

Result<std::optional<std::string>> StateStore::volume_format(const std::string& pool, const std::string& volume) {
  std::lock_guard lock(mutex_);
  Statement st(db_, "SELECT format FROM volumes WHERE pool = ? AND name = ?");
  st.bind(1, pool);
  st.bind(2, volume);
  TRY(st.ready());
  int rc = st.step();
  if (rc == SQLITE_ROW) return std::optional<std::string>(st.text(0));
  if (rc != SQLITE_DONE) return fail(EIO, fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  return std::optional<std::string>();
}

Result<void> StateStore::forget_volume(const std::string& pool, const std::string& volume) {
  std::lock_guard lock(mutex_);
  Statement st(db_, "DELETE FROM volumes WHERE pool = ? AND name = ?");
  st.bind(1, pool);
  st.bind(2, volume);
  return st.run();
}

Result<void> StateStore::upsert_network(const NetworkRecord& r) {
  std::lock_guard lock(mutex_);
  Statement st(db_, "INSERT INTO networks (name, definition, active) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET definition = excluded.definition, active = excluded.active");
  st.bind(1, r.name);
  st.bind(2, r.definition.dump());
  st.bind(3, static_cast<int64_t>(r.active));
  return st.run();
}

Result<void> StateStore::delete_network(const std::string& name) {
  std::lock_guard lock(mutex_);
  Statement st(db_, "DELETE FROM networks WHERE name = ?");
  st.bind(1, name);
  return st.run();
}

Result<std::vector<NetworkRecord>> StateStore::list_networks() {
  std::lock_guard lock(mutex_);
  Statement st(db_, "SELECT name, definition, active FROM networks ORDER BY name");
  TRY(st.ready());
  std::vector<NetworkRecord> out;
  int rc;
  while ((rc = st.step()) == SQLITE_ROW) out.push_back(NetworkRecord{st.text(0), parse_stored(st.text(1)), st.integer(2) != 0});
  if (rc != SQLITE_DONE) return fail(EIO, fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  return out;
}

}  // namespace keel::hostd
