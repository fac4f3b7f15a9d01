/*
 * Streams a model's layers through the C API and prints a checksum of every
 * layer and the statistics of each pass.
 *
 *   stream MODEL_DIR [--device N] [--passes N]
 *
 * --device -1 (the default) runs the host backend: no GPU needed, and the
 * "device" pointers are host addresses, hashed in place. On a CUDA device
 * (--device 0) the bytes are copied back with ls_layer_copy_to_host, so the
 * example needs no CUDA headers. Build: see the Makefile next to this file.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layer_streamer.h"

/* FNV-1a, 64-bit, continued from `h`. */
static uint64_t fnv1a(uint64_t h, const uint8_t *p, uint64_t n) {
  for (uint64_t i = 0; i < n; i++) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

static int fail(const char *what, ls_result r) {
  char msg[1024];
  ls_last_error_message(msg, sizeof msg, NULL);
  fprintf(stderr, "%s: %s: %s\n", what, ls_result_name(r), msg);
  return 1;
}

struct pass {
  int on_host;
  uint8_t *scratch;
  uint64_t scratch_len;
};

/* Called once per layer, in order, with the layer's weights on the device. */
static int on_layer(void *user, uint32_t layer, const ls_layer_weights *w,
                    ls_cuda_stream stream) {
  struct pass *p = user;
  (void)stream; /* a real caller launches its kernels on this stream */
  uint64_t h = 0xcbf29ce484222325ull, bytes = 0;
  for (uint32_t i = 0; i < w->num_tensors; i++) {
    const ls_tensor_view *v = &w->tensors[i];
    const uint8_t *data;
    if (p->on_host) {
      data = (const uint8_t *)(uintptr_t)v->ptr;
    } else {
      if (v->bytes > p->scratch_len) {
        free(p->scratch);
        p->scratch = malloc(v->bytes);
        p->scratch_len = p->scratch ? v->bytes : 0;
        if (!p->scratch) return 1;
      }
      if (ls_layer_copy_to_host(w, i, p->scratch, p->scratch_len) != LS_OK) return 2;
      data = p->scratch;
    }
    h = fnv1a(h, data, v->bytes);
    bytes += v->bytes;
  }
  printf("  layer %3u  %2u tensors  %10" PRIu64 " bytes  fnv1a %016" PRIx64 "\n", layer,
         w->num_tensors, bytes, h);
  return 0;
}

static void print_stage(const char *name, const ls_stage_stats *s) {
  printf("  %-8s %12" PRIu64 " bytes  busy %8.4f s  stalled %8.4f s  items %" PRIu64 "\n", name,
         s->bytes, s->busy_seconds, s->stalled_seconds, s->items);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s MODEL_DIR [--device N] [--passes N]\n", argv[0]);
    return 2;
  }
  int32_t device = -1;
  int passes = 1;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--device") == 0) device = atoi(argv[i + 1]);
    else if (strcmp(argv[i], "--passes") == 0) passes = atoi(argv[i + 1]);
  }

  ls_model *model = NULL;
  ls_result r = ls_model_open(argv[1], &model);
  if (r != LS_OK) return fail("opening the model", r);
  printf("%s: %u layers, %u static tensors, %u files, %" PRIu64 " bytes per pass\n",
         ls_model_dir(model), ls_model_num_layers(model), ls_model_num_statics(model),
         ls_model_num_files(model), ls_model_total_layer_bytes(model));

  ls_config config = ls_config_default();
  config.device = device;
  config.dtype = LS_DTYPE_FILE; /* no casts: the checksums are the files' bytes */
  ls_streamer *streamer = NULL;
  r = ls_streamer_new(model, &config, &streamer);
  if (r != LS_OK) {
    ls_model_free(model);
    return fail("building the streamer", r);
  }

  struct pass p = {device < 0, NULL, 0};
  int status = 0;
  for (int i = 1; i <= passes && status == 0; i++) {
    printf("pass %d\n", i);
    r = ls_streamer_run_pass(streamer, on_layer, &p);
    if (r != LS_OK) {
      status = fail("pass", r);
      break;
    }
    ls_pass_stats st;
    ls_streamer_last_pass_stats(streamer, &st);
    printf("  %" PRIu64 " layers, %" PRIu64 " bytes in %.4f s (%.2f GB/s)\n", st.layers,
           st.layer_bytes, st.wall_seconds,
           st.wall_seconds > 0 ? st.layer_bytes / st.wall_seconds / 1e9 : 0.0);
    print_stage("read", &st.read);
    print_stage("pin", &st.pin);
    print_stage("h2d", &st.h2d);
    print_stage("compute", &st.compute);
  }
  free(p.scratch);
  ls_streamer_free(streamer);
  ls_model_free(model);
  return status;
}
