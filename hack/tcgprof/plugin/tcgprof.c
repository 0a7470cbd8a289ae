/*
 * tcgprof: a QEMU TCG plugin that counts, per translated block, how many times the
 * guest executed it. Loaded with
 *
 *     -plugin /path/tcgprof.so,ctl=/path/ctl
 *
 * it polls ctl every 50 ms; when ctl holds a path, it writes the cumulative counts there
 * ("vaddr n_insns executions" per block, hex vaddr) and removes ctl. Two dumps around a
 * window, subtracted (hack/tcgprof), give the guest instructions executed in
 * it, by guest virtual address: QEMU's own tools cannot see inside its translated code,
 * and the guest cannot profile itself without changing what it runs.
 *
 * QEMU 7.2's plugin API, version 1; the declarations below are the ones this file uses
 * (Debian ships no qemu-plugin.h).
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
typedef struct qemu_info_t qemu_info_t;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id,
                                           void (*cb)(qemu_plugin_id_t, struct qemu_plugin_tb *));
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                              void *ptr, uint64_t imm);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

struct block {
	uint64_t vaddr;
	uint64_t insns;
	uint64_t count;
};

enum { CHUNK = 1 << 16 };
struct chunk {
	struct block b[CHUNK];
	size_t n;
	struct chunk *next;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct chunk *chunks;
static char *ctl;

/* Each translation gets its own counter, never moved: the translated code adds to it
 * directly. A block translated again (after a flush, or from another page mapping) gets
 * another; the reader sums them by address. */
static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
	struct block *b;

	pthread_mutex_lock(&lock);
	if (!chunks || chunks->n == CHUNK) {
		struct chunk *c = calloc(1, sizeof(*c));
		if (!c) {
			pthread_mutex_unlock(&lock);
			return;
		}
		c->next = chunks;
		chunks = c;
	}
	b = &chunks->b[chunks->n];
	b->vaddr = qemu_plugin_tb_vaddr(tb);
	b->insns = qemu_plugin_tb_n_insns(tb);
	chunks->n++;
	pthread_mutex_unlock(&lock);
	qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->count, 1);
}

static void dump(const char *path)
{
	char tmp[4096];
	FILE *f;

	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "w");
	if (!f)
		return;
	pthread_mutex_lock(&lock);
	for (struct chunk *c = chunks; c; c = c->next)
		for (size_t i = 0; i < c->n; i++)
			if (c->b[i].count)
				fprintf(f, "%" PRIx64 " %" PRIu64 " %" PRIu64 "\n", c->b[i].vaddr,
				        c->b[i].insns, __atomic_load_n(&c->b[i].count, __ATOMIC_RELAXED));
	pthread_mutex_unlock(&lock);
	if (fclose(f) == 0)
		rename(tmp, path);
}

static void *poll_ctl(void *arg)
{
	(void)arg;
	for (;;) {
		char path[4096];
		FILE *f = fopen(ctl, "r");
		if (f) {
			size_t n = fread(path, 1, sizeof(path) - 1, f);
			fclose(f);
			path[n] = 0;
			path[strcspn(path, "\n")] = 0;
			if (n > 0) {
				dump(path);
				unlink(ctl);
			}
		}
		usleep(50 * 1000);
	}
	return NULL;
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id,
                                                               const qemu_info_t *info,
                                                               int argc, char **argv)
{
	pthread_t t;

	(void)info;
	for (int i = 0; i < argc; i++)
		if (strncmp(argv[i], "ctl=", 4) == 0)
			ctl = strdup(argv[i] + 4);
	if (!ctl) {
		fprintf(stderr, "tcgprof: want ctl=PATH\n");
		return -1;
	}
	qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
	return pthread_create(&t, NULL, poll_ctl, NULL);
}
