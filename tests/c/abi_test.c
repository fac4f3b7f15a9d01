/*
 * The C API end to end, from C: model inspection, passes whose bytes match
 * the files, error codes and messages, NULL arguments, ownership.
 *
 *   abi_test MODEL_DIR EXPECTED_FILE [--device N]
 *
 * EXPECTED_FILE (written by tests/c_abi.rs) holds, for every tensor, its
 * bytes and the FNV-1a 64 hash of its bytes in the files:
 *   layers <n> statics <k>
 *   L <layer> <index> <key> <bytes> <hash>
 *   S <index> <name> <bytes> <hash>
 * With --device -1 (the default, the host backend) device pointers are host
 * addresses and are hashed in place as well; on a CUDA device the bytes are
 * copied back with ls_layer_copy_to_host.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layer_streamer.h"

#define MAX_LAYERS 64
#define MAX_TENSORS 32
#define MAX_STATICS 8
#define NAME_LEN 256

struct expected_tensor {
  char key[NAME_LEN];
  uint64_t bytes;
  uint64_t hash;
};

struct expected {
  uint32_t layers;
  uint32_t statics;
  uint32_t count[MAX_LAYERS];
  struct expected_tensor t[MAX_LAYERS][MAX_TENSORS];
  struct expected_tensor s[MAX_STATICS];
};

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                          \
  do {                                                            \
    checks++;                                                     \
    if (!(cond)) {                                                \
      failures++;                                                 \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                               \
      fprintf(stderr, "\n");                                      \
    }                                                             \
  } while (0)

/* FNV-1a over p[0..n), going on from h (start with FNV_START). */
#define FNV_START 0xcbf29ce484222325ull
static uint64_t fnv1a_from(uint64_t h, const uint8_t *p, uint64_t n) {
  for (uint64_t i = 0; i < n; i++) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

static uint64_t fnv1a(const uint8_t *p, uint64_t n) { return fnv1a_from(FNV_START, p, n); }

static const char *last_error(void) {
  static char buf[1024];
  size_t len = 0;
  if (ls_last_error_message(buf, sizeof buf, &len) != LS_OK) return "(no message)";
  return buf;
}

static int read_expected(const char *path, struct expected *e) {
  FILE *f = fopen(path, "r");
  if (!f) {
    perror(path);
    return -1;
  }
  memset(e, 0, sizeof *e);
  if (fscanf(f, " layers %" SCNu32 " statics %" SCNu32, &e->layers, &e->statics) != 2 ||
      e->layers > MAX_LAYERS || e->statics > MAX_STATICS) {
    fclose(f);
    return -1;
  }
  char kind[4];
  while (fscanf(f, " %3s", kind) == 1) {
    uint32_t a = 0, b = 0;
    struct expected_tensor t;
    if (kind[0] == 'L') {
      if (fscanf(f, " %" SCNu32 " %" SCNu32 " %255s %" SCNu64 " %" SCNx64, &a, &b, t.key,
                 &t.bytes, &t.hash) != 5 ||
          a >= e->layers || b >= MAX_TENSORS)
        break;
      e->t[a][b] = t;
      if (b + 1 > e->count[a]) e->count[a] = b + 1;
    } else if (kind[0] == 'S') {
      if (fscanf(f, " %" SCNu32 " %255s %" SCNu64 " %" SCNx64, &a, t.key, &t.bytes, &t.hash) != 4 ||
          a >= e->statics)
        break;
      e->s[a] = t;
    } else {
      break;
    }
  }
  fclose(f);
  return 0;
}

struct pass_state {
  const struct expected *e;
  int on_host;
  uint32_t next_layer;
  int fail_at;       /* layer whose callback returns fail_value; -1: none */
  int fail_value;
  ls_streamer *self; /* for the re-entrancy check */
  uint32_t calls;
};

static int check_layer(void *user, uint32_t layer, const ls_layer_weights *w,
                       ls_cuda_stream stream) {
  struct pass_state *st = user;
  st->calls++;
  CHECK(layer == st->next_layer, "layer %u, expected %u", layer, st->next_layer);
  CHECK(w->layer == layer, "weights of layer %u in call for %u", w->layer, layer);
  CHECK((stream == NULL) == st->on_host, "stream %p on %s", stream,
        st->on_host ? "host" : "cuda");
  st->next_layer = layer + 1;
  if ((int)layer == st->fail_at) return st->fail_value;
  if (layer >= st->e->layers) return 1;

  CHECK(w->num_tensors == st->e->count[layer], "layer %u: %u tensors, expected %u", layer,
        w->num_tensors, st->e->count[layer]);
  for (uint32_t i = 0; i < w->num_tensors && i < MAX_TENSORS; i++) {
    const ls_tensor_view *v = &w->tensors[i];
    const struct expected_tensor *x = &st->e->t[layer][i];
    CHECK(strcmp(v->key, x->key) == 0, "layer %u tensor %u: key %s, expected %s", layer, i,
          v->key, x->key);
    CHECK(strstr(v->name, v->key) != NULL, "name %s does not contain key %s", v->name, v->key);
    CHECK(v->bytes == x->bytes, "%s: %" PRIu64 " bytes, expected %" PRIu64, v->name, v->bytes,
          x->bytes);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < v->ndim; d++) numel *= v->shape[d];
    uint64_t size = v->dtype == LS_DTYPE_F32 ? 4 : 2;
    CHECK(numel * size == v->bytes, "%s: shape and dtype give %" PRIu64 " bytes, not %" PRIu64,
          v->name, numel * size, v->bytes);
    if (st->on_host) {
      uint64_t h = fnv1a((const uint8_t *)(uintptr_t)v->ptr, v->bytes);
      CHECK(h == x->hash, "%s: bytes in place differ from the file", v->name);
    }
    uint8_t *copy = malloc(v->bytes ? v->bytes : 1);
    ls_result r = ls_layer_copy_to_host(w, i, copy, v->bytes);
    CHECK(r == LS_OK, "ls_layer_copy_to_host: %s", last_error());
    if (r == LS_OK)
      CHECK(fnv1a(copy, v->bytes) == x->hash, "%s: copied bytes differ from the file", v->name);
    free(copy);
  }
  /* Out of range and too small a buffer are argument errors. */
  uint8_t byte;
  CHECK(ls_layer_copy_to_host(w, w->num_tensors, &byte, 1) == LS_INVALID_ARGUMENT, "index");
  if (w->num_tensors > 0 && w->tensors[0].bytes > 1)
    CHECK(ls_layer_copy_to_host(w, 0, &byte, 1) == LS_INVALID_ARGUMENT, "short dst");
  CHECK(ls_layer_copy_to_host(NULL, 0, &byte, 1) == LS_NULL_ARGUMENT, "NULL weights");

  /* The streamer is busy during its own pass. */
  if (st->self) {
    ls_pass_stats ps;
    CHECK(ls_streamer_last_pass_stats(st->self, &ps) == LS_INVALID_ARGUMENT,
          "re-entrant call not rejected");
    CHECK(strstr(last_error(), "busy") != NULL, "message: %s", last_error());
    CHECK(ls_streamer_run_pass(st->self, check_layer, st) == LS_INVALID_ARGUMENT,
          "re-entrant pass not rejected");
  }
  /* Work on the pass's own stream needs no release, but announcing it is valid. */
  CHECK(ls_layer_release_after(w, stream) == LS_OK, "release_after: %s", last_error());
  return 0;
}

struct free_state {
  ls_streamer *self;
  uint32_t calls;
};

/* Frees its own streamer in the first call: deferred until the pass returns. */
static int free_self(void *user, uint32_t layer, const ls_layer_weights *w,
                     ls_cuda_stream stream) {
  struct free_state *st = user;
  (void)w;
  (void)stream;
  st->calls++;
  if (layer == 0) ls_streamer_free(st->self);
  return 0;
}

static void check_model(const ls_model *m, const struct expected *e) {
  CHECK(ls_model_num_layers(m) == e->layers, "%u layers", ls_model_num_layers(m));
  CHECK(ls_model_num_statics(m) == e->statics, "%u statics", ls_model_num_statics(m));
  CHECK(ls_model_num_files(m) >= 1, "no files");
  CHECK(ls_model_dir(m) != NULL, "no dir");
  uint64_t total = 0;
  for (uint32_t l = 0; l < e->layers; l++) {
    CHECK(ls_model_layer_num_tensors(m, l) == e->count[l], "layer %u count", l);
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < e->count[l]; i++) {
      ls_tensor_info info;
      CHECK(ls_model_layer_tensor(m, l, i, &info) == LS_OK, "%s", last_error());
      CHECK(strcmp(info.key, e->t[l][i].key) == 0, "key %s", info.key);
      CHECK(info.bytes == e->t[l][i].bytes, "bytes of %s", info.name);
      CHECK(info.file < ls_model_num_files(m), "file index %u", info.file);
      CHECK(info.ndim >= 1 && info.shape != NULL, "shape of %s", info.name);
      bytes += info.bytes;
    }
    CHECK(ls_model_layer_bytes(m, l) == bytes, "layer %u bytes", l);
    total += bytes;
  }
  CHECK(ls_model_total_layer_bytes(m) == total, "total bytes");
  ls_tensor_info info;
  CHECK(ls_model_layer_tensor(m, e->layers, 0, &info) == LS_INVALID_ARGUMENT, "layer range");
  CHECK(ls_model_layer_tensor(m, 0, 1000, &info) == LS_INVALID_ARGUMENT, "tensor range");
  CHECK(strstr(last_error(), "out of range") != NULL, "message: %s", last_error());
  CHECK(ls_model_layer_tensor(m, 0, 0, NULL) == LS_NULL_ARGUMENT, "NULL out");
  for (uint32_t i = 0; i < e->statics; i++) {
    CHECK(ls_model_static_tensor(m, i, &info) == LS_OK, "%s", last_error());
    CHECK(strcmp(info.name, e->s[i].key) == 0, "static %s", info.name);
  }
  CHECK(ls_model_static_tensor(m, e->statics, &info) == LS_INVALID_ARGUMENT, "static range");
  CHECK(ls_model_layer_num_tensors(m, e->layers) == 0, "count out of range");
}

/* ls_model_file_path maps ls_tensor_info.file to the file: each layer
 * tensor's bytes, read from that path at file_offset, hash as expected. */
static void check_file_paths(const ls_model *m, const struct expected *e) {
  size_t need = 0;
  CHECK(ls_model_file_path(m, 0, NULL, 0, &need) == LS_OK && need > 0, "size query");
  char small[2];
  CHECK(ls_model_file_path(m, 0, small, sizeof small, NULL) == LS_INVALID_ARGUMENT &&
            small[0] == 0, "short buffer");
  CHECK(ls_model_file_path(m, ls_model_num_files(m), small, 0, NULL) == LS_INVALID_ARGUMENT,
        "file range");
  CHECK(ls_model_file_path(NULL, 0, NULL, 0, NULL) == LS_NULL_ARGUMENT, "NULL model");
  for (uint32_t l = 0; l < e->layers; l++) {
    for (uint32_t i = 0; i < e->count[l]; i++) {
      ls_tensor_info info;
      char path[4096];
      size_t n = 0;
      if (ls_model_layer_tensor(m, l, i, &info) != LS_OK) continue;
      CHECK(ls_model_file_path(m, info.file, path, sizeof path, &n) == LS_OK, "%s", last_error());
      CHECK(n == strlen(path), "length %zu of %s", n, path);
      FILE *f = fopen(path, "rb");
      CHECK(f != NULL, "open %s", path);
      if (!f) continue;
      uint8_t *buf = malloc(info.bytes);
      CHECK(fseek(f, (long)info.file_offset, SEEK_SET) == 0 &&
                fread(buf, 1, info.bytes, f) == info.bytes, "read %s", info.name);
      CHECK(fnv1a(buf, info.bytes) == e->t[l][i].hash, "%s: bytes at %s differ", info.name, path);
      free(buf);
      fclose(f);
    }
  }
}

static void check_nulls(void) {
  ls_model *m = (ls_model *)1;
  ls_streamer *s = (ls_streamer *)1;
  ls_config c = ls_config_default();
  CHECK(ls_model_open(NULL, &m) == LS_NULL_ARGUMENT, "open NULL path");
  CHECK(m == NULL, "out not cleared");
  CHECK(strstr(last_error(), "path") != NULL, "message: %s", last_error());
  CHECK(ls_model_open("x", NULL) == LS_NULL_ARGUMENT, "open NULL out");
  CHECK(ls_streamer_new(NULL, &c, &s) == LS_NULL_ARGUMENT, "new NULL model");
  CHECK(s == NULL, "out not cleared");
  CHECK(ls_streamer_run_pass(NULL, check_layer, NULL) == LS_NULL_ARGUMENT, "run NULL");
  CHECK(ls_streamer_last_pass_stats(NULL, NULL) == LS_NULL_ARGUMENT, "stats NULL");
  CHECK(ls_streamer_memory(NULL, NULL) == LS_NULL_ARGUMENT, "memory NULL");
  CHECK(ls_streamer_compute_stream(NULL) == NULL, "stream NULL");
  CHECK(ls_tensor_copy_to_host(NULL, NULL, 0) == LS_NULL_ARGUMENT, "copy NULL");
  CHECK(ls_last_error_message(NULL, 4, NULL) == LS_NULL_ARGUMENT, "message NULL");
  CHECK(ls_last_error_message(NULL, 0, NULL) == LS_OK, "message NULL, 0");
  CHECK(ls_model_num_layers(NULL) == 0, "layers NULL");
  CHECK(ls_model_dir(NULL) == NULL, "dir NULL");
  CHECK(ls_tensor_bytes(NULL) == 0 && ls_tensor_name(NULL) == NULL, "tensor NULL");
  CHECK(strcmp(ls_result_name(LS_CALLBACK), "LS_CALLBACK") == 0, "name");
  CHECK(strcmp(ls_result_name(4242), "LS_UNKNOWN_RESULT") == 0, "unknown name");
  ls_model_free(NULL);
  ls_streamer_free(NULL);
  ls_tensor_free(NULL);
}

static ls_config test_config(int32_t device) {
  ls_config c = ls_config_default();
  c.device = device;
  c.dtype = LS_DTYPE_FILE;
  c.n_gpu = 2;
  c.n_cpu_pinned = 2;
  c.n_cpu = 1;
  c.reader_threads = 2;
  c.read_chunk = 8192;
  return c;
}

/* With a CPU share: each tensor's device rows then its host rows are the
   file's bytes. */
static int check_split_layer(void *user, uint32_t layer, const ls_layer_weights *w,
                             ls_cuda_stream stream) {
  (void)stream;
  struct pass_state *st = user;
  st->calls++;
  if (layer >= st->e->layers) return 1;
  for (uint32_t i = 0; i < w->num_tensors && i < MAX_TENSORS; i++) {
    const ls_tensor_view *v = &w->tensors[i];
    const struct expected_tensor *x = &st->e->t[layer][i];
    ls_host_rows h;
    CHECK(ls_layer_host_rows(w, i, &h) == LS_OK, "ls_layer_host_rows: %s", last_error());
    CHECK(v->bytes + h.bytes == x->bytes, "%s: %" PRIu64 " + %" PRIu64 " bytes, expected %" PRIu64,
          v->name, v->bytes, h.bytes, x->bytes);
    if (v->ndim == 2) {
      CHECK(h.rows > 0 && h.data != NULL, "%s: a matrix without CPU rows", v->name);
      CHECK(v->shape[0] == h.first_row && v->shape[1] == h.cols, "%s: shapes", v->name);
    } else {
      CHECK(h.rows == 0 && h.data == NULL, "%s: CPU rows of a vector", v->name);
    }
    uint8_t *copy = malloc(v->bytes ? v->bytes : 1);
    CHECK(ls_layer_copy_to_host(w, i, copy, v->bytes) == LS_OK, "copy: %s", last_error());
    uint64_t hash = fnv1a_from(fnv1a(copy, v->bytes), h.data, h.bytes);
    CHECK(hash == x->hash, "%s: device rows and host rows differ from the file", v->name);
    free(copy);
  }
  ls_host_rows h;
  CHECK(ls_layer_host_rows(w, w->num_tensors, &h) == LS_INVALID_ARGUMENT, "host rows index");
  CHECK(ls_layer_host_rows(w, 0, NULL) == LS_NULL_ARGUMENT, "host rows NULL out");
  return 0;
}

static void check_split(const ls_model *m, const struct expected *e, int32_t device) {
  uint64_t total = 0;
  for (uint32_t l = 0; l < e->layers; l++)
    for (uint32_t i = 0; i < e->count[l]; i++) total += e->t[l][i].bytes;
  ls_config c = test_config(device);
  c.cpu_share = 1.5;
  ls_streamer *s = NULL;
  CHECK(ls_streamer_new(m, &c, &s) == LS_CONFIG, "cpu_share 1.5");
  CHECK(strstr(last_error(), "cpu_share") != NULL, "message: %s", last_error());
  c.cpu_share = 0.5;
  ls_result r = ls_streamer_new(m, &c, &s);
  CHECK(r == LS_OK, "streamer with cpu_share 0.5: %s", last_error());
  if (r != LS_OK) return;
  struct pass_state st = {e, device < 0, 0, -1, 0, NULL, 0};
  r = ls_streamer_run_pass(s, check_split_layer, &st);
  CHECK(r == LS_OK && st.calls == e->layers, "split pass: %s", last_error());
  ls_pass_stats ps;
  CHECK(ls_streamer_last_pass_stats(s, &ps) == LS_OK, "%s", last_error());
  CHECK(ps.cpu_share == 0.5 && ps.cpu.bytes > 0 && ps.cpu.bytes + ps.layer_bytes == total,
        "split stats: share %f, cpu %" PRIu64 " + device %" PRIu64 " bytes, expected %" PRIu64,
        ps.cpu_share, ps.cpu.bytes, ps.layer_bytes, total);
  ls_streamer_free(s);
}

static void check_statics(ls_streamer *s, const struct expected *e, int on_host) {
  for (uint32_t i = 0; i < e->statics; i++) {
    ls_tensor *t = NULL;
    CHECK(ls_streamer_load_static(s, e->s[i].key, &t) == LS_OK, "%s", last_error());
    if (!t) continue;
    CHECK(strcmp(ls_tensor_name(t), e->s[i].key) == 0, "name %s", ls_tensor_name(t));
    CHECK(ls_tensor_bytes(t) == e->s[i].bytes, "bytes of %s", e->s[i].key);
    CHECK(ls_tensor_ndim(t) >= 1 && ls_tensor_shape(t) != NULL, "shape");
    CHECK(ls_tensor_dtype(t) != LS_DTYPE_FILE, "dtype");
    CHECK(ls_tensor_ptr(t) != 0, "ptr");
    uint64_t n = ls_tensor_bytes(t);
    uint8_t *buf = malloc(n);
    CHECK(ls_tensor_copy_to_host(t, buf, n) == LS_OK, "%s", last_error());
    CHECK(fnv1a(buf, n) == e->s[i].hash, "%s: bytes differ", e->s[i].key);
    CHECK(ls_tensor_copy_to_host(t, buf, n - 1) == LS_INVALID_ARGUMENT, "short copy");
    if (on_host)
      CHECK(fnv1a((const uint8_t *)(uintptr_t)ls_tensor_ptr(t), n) == e->s[i].hash, "in place");
    free(buf);
    ls_tensor_free(t);
  }
  ls_tensor *t = (ls_tensor *)1;
  CHECK(ls_streamer_load_static(s, "no.such.tensor", &t) == LS_UNKNOWN_TENSOR, "unknown");
  CHECK(t == NULL, "out not cleared");
  CHECK(strstr(last_error(), "no.such.tensor") != NULL, "message: %s", last_error());
  CHECK(ls_streamer_load_static(s, "\xff\xfe", &t) == LS_INVALID_ARGUMENT, "bad UTF-8");
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s MODEL_DIR EXPECTED_FILE [--device N]\n", argv[0]);
    return 2;
  }
  int32_t device = -1;
  for (int i = 3; i + 1 < argc; i++)
    if (strcmp(argv[i], "--device") == 0) device = atoi(argv[i + 1]);
  int on_host = device < 0;
  static struct expected e;
  if (read_expected(argv[2], &e) != 0) {
    fprintf(stderr, "cannot read %s\n", argv[2]);
    return 2;
  }

  check_nulls();

  /* A missing directory: the code and the path in the message. */
  ls_model *m = NULL;
  ls_result r = ls_model_open("/nonexistent/model-dir", &m);
  CHECK(r == LS_IO || r == LS_MODEL, "missing dir gave %s", ls_result_name(r));
  CHECK(strstr(last_error(), "/nonexistent/model-dir") != NULL, "message: %s", last_error());
  CHECK(m == NULL, "out not NULL");

  r = ls_model_open(argv[1], &m);
  CHECK(r == LS_OK, "ls_model_open(%s): %s: %s", argv[1], ls_result_name(r), last_error());
  if (r != LS_OK) return 1;
  check_model(m, &e);
  check_file_paths(m, &e);

  /* Bad configurations. */
  ls_streamer *s = (ls_streamer *)1;
  ls_config c = test_config(device);
  c.read_chunk = 1000;
  CHECK(ls_streamer_new(m, &c, &s) == LS_CONFIG, "read_chunk 1000");
  CHECK(strstr(last_error(), "read_chunk") != NULL, "message: %s", last_error());
  CHECK(s == NULL, "out not NULL");
  c = test_config(device);
  c.dtype = 99;
  CHECK(ls_streamer_new(m, &c, &s) == LS_INVALID_ARGUMENT, "dtype 99");
  c = test_config(device);
  c.gpu_cache.kind = 7;
  CHECK(ls_streamer_new(m, &c, &s) == LS_INVALID_ARGUMENT, "budget kind 7");
  CHECK(ls_streamer_new(m, NULL, &s) == LS_NULL_ARGUMENT, "NULL config");

  c = test_config(device);
  r = ls_streamer_new(m, &c, &s);
  CHECK(r == LS_OK, "ls_streamer_new: %s: %s", ls_result_name(r), last_error());
  if (r != LS_OK) {
    ls_model_free(m);
    return 1;
  }
  /* A streamer freed from its own callback is freed when the pass returns
     (valgrind's leak check fails the test if it is not). */
  ls_streamer *doomed = NULL;
  r = ls_streamer_new(m, &c, &doomed);
  CHECK(r == LS_OK, "ls_streamer_new: %s", last_error());
  if (r == LS_OK) {
    struct free_state fs = {doomed, 0};
    r = ls_streamer_run_pass(doomed, free_self, &fs);
    CHECK(r == LS_OK, "pass that frees its streamer: %s", last_error());
    CHECK(fs.calls == e.layers, "%u calls in a pass that frees its streamer", fs.calls);
  }
  check_split(m, &e, device);
  /* The streamer keeps what it needs: the model can go first. */
  ls_model_free(m);
  CHECK((ls_streamer_compute_stream(s) == NULL) == on_host, "compute stream");
  ls_memory_use mem;
  CHECK(ls_streamer_memory(s, &mem) == LS_OK && mem.gpu_slots == 3, "memory: %s", last_error());

  ls_pass_stats ps;
  CHECK(ls_streamer_last_pass_stats(s, &ps) == LS_OK && ps.pass == 0, "stats before a pass");
  uint64_t total = 0;
  for (uint32_t l = 0; l < e.layers; l++)
    for (uint32_t i = 0; i < e.count[l]; i++) total += e.t[l][i].bytes;

  for (int pass = 1; pass <= 2; pass++) {
    struct pass_state st = {&e, on_host, 0, -1, 0, s, 0};
    r = ls_streamer_run_pass(s, check_layer, &st);
    CHECK(r == LS_OK, "pass %d: %s: %s", pass, ls_result_name(r), last_error());
    CHECK(st.calls == e.layers, "pass %d: %u calls", pass, st.calls);
    CHECK(ls_streamer_last_pass_stats(s, &ps) == LS_OK, "%s", last_error());
    CHECK(ps.pass == (uint64_t)pass && ps.layers == e.layers && ps.layer_bytes == total,
          "stats: pass %" PRIu64 " layers %" PRIu64 " bytes %" PRIu64, ps.pass, ps.layers,
          ps.layer_bytes);
    CHECK(ps.h2d.bytes > 0 && ps.wall_seconds > 0, "stage stats");
  }

  /* A callback that fails ends the pass with its value in the message. */
  uint32_t fail_layer = e.layers > 1 ? 1 : 0;
  struct pass_state st = {&e, on_host, 0, (int)fail_layer, 7, NULL, 0};
  r = ls_streamer_run_pass(s, check_layer, &st);
  CHECK(r == LS_CALLBACK, "failing callback gave %s", ls_result_name(r));
  char want[64];
  snprintf(want, sizeof want, "at layer %u: callback returned 7", fail_layer);
  CHECK(strstr(last_error(), want) != NULL, "message: %s", last_error());
  CHECK(st.calls == fail_layer + 1, "%u calls after the failure", st.calls);
  /* The next pass works. */
  struct pass_state again = {&e, on_host, 0, -1, 0, NULL, 0};
  r = ls_streamer_run_pass(s, check_layer, &again);
  CHECK(r == LS_OK && again.calls == e.layers, "pass after a failure: %s", last_error());
  CHECK(ls_streamer_run_pass(s, NULL, NULL) == LS_NULL_ARGUMENT, "NULL callback");

  /* Outside a callback there is no current layer. */
  uint8_t byte;
  ls_layer_weights fake = {0, 0, NULL};
  CHECK(ls_layer_copy_to_host(&fake, 0, &byte, 1) == LS_INVALID_ARGUMENT, "copy outside");

  check_statics(s, &e, on_host);
  /* A static tensor outlives its streamer. */
  ls_tensor *keep = NULL;
  if (e.statics > 0) CHECK(ls_streamer_load_static(s, e.s[0].key, &keep) == LS_OK, "keep");
  ls_streamer_free(s);
  if (keep) {
    uint8_t *buf = malloc(ls_tensor_bytes(keep));
    CHECK(ls_tensor_copy_to_host(keep, buf, ls_tensor_bytes(keep)) == LS_OK, "%s", last_error());
    CHECK(fnv1a(buf, ls_tensor_bytes(keep)) == e.s[0].hash, "kept tensor bytes");
    free(buf);
    ls_tensor_free(keep);
  }

  if (failures) {
    fprintf(stderr, "abi_test: %d of %d checks failed\n", failures, checks);
    return 1;
  }
  printf("abi_test: %d checks passed on %s (%u layers)\n", checks,
         on_host ? "the host backend" : "CUDA", e.layers);
  return 0;
}
