/* run_blocks: independent blocks of work on the calling thread and helper threads of this
   library's own, for charrnn's int8 step (lstm_int8.c: a step's blocks of 32 rows). Linux.

   The caller and the helpers claim blocks one at a time from one counter word, which also holds
   the job's number: no one waits at a barrier, a helper the OS has not scheduled claims nothing
   (the caller runs what is left, no slower than alone), and a helper that wakes late cannot
   claim a block of a later job. Not OpenMP: Serve's engine steps from a thread of its own;
   libgomp gives every thread that starts parallel regions its own pool and, with more pool
   threads than cores, cuts their spinning to about 1,000 rounds, so every region paid a futex
   wake-up and two threads made a 64-row step slower than one. Between jobs a helper polls (and
   yields its core) for SPIN_NS, longer than the gap between two steps of a batch, then sleeps on
   a futex. One job at a time: a caller that finds the helpers busy (two models stepping during a
   hot swap) runs its blocks alone. A forked child starts helpers of its own. */
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <immintrin.h>

#define MAX_HELPERS 15
#define SPIN_NS 200000

typedef void (*block_fn)(const void *ctx, int block);
typedef void (*thread_fn)(void);

static struct {
  _Atomic uint32_t go;        /* jobs posted so far: helpers wait for it to change */
  _Atomic uint64_t claim;     /* job << 32 | its blocks << 16 | the next unclaimed block */
  _Atomic uint32_t done;      /* blocks of the posted job finished */
  _Atomic int invited;        /* helpers 0 .. invited-1 take part in it */
  _Atomic int sleepers;       /* helpers asleep on go */
  _Atomic int waiting;        /* the caller asleep on done */
  block_fn _Atomic fn;        /* the posted job: fn(ctx, block) for each block, */
  const void *_Atomic ctx;    /* each thread calling enter() before its first and */
  thread_fn _Atomic enter, leave; /* leave() after its last */
  int started;                /* helper threads running (they live as long as the process) */
} pool;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */

static long futex(_Atomic uint32_t *addr, int op, uint32_t val) {
  return syscall(SYS_futex, (uint32_t *)addr, op | FUTEX_PRIVATE_FLAG, val, NULL, NULL, 0);
}

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Waits until *addr is no longer `old`: polling for SPIN_NS, yielding the core between polls
   (should the other side be queued on this core, it runs now rather than after a time slice),
   then asleep, counted in *sleeping (the other side wakes the futex when it sees a sleeper
   after changing *addr). Returns the new value. */
static uint32_t wait_change(_Atomic uint32_t *addr, uint32_t old, _Atomic int *sleeping) {
  uint32_t v;
  const int64_t until = now_ns() + SPIN_NS;
  for (int i = 1; (v = atomic_load(addr)) == old; i++) {
    if (i < 16) {
      _mm_pause();
      continue;
    }
    sched_yield();
    if (now_ns() > until) {
      atomic_fetch_add(sleeping, 1);
      while ((v = atomic_load(addr)) == old)
        futex(addr, FUTEX_WAIT, old);
      atomic_fetch_sub(sleeping, 1);
      break;
    }
  }
  return v;
}

/* The next block of job `job`, or -1 when it has none left (or a later job is posted). */
static int claim(uint32_t job) {
  uint64_t c = atomic_load(&pool.claim);
  for (;;) {
    if ((uint32_t)(c >> 32) != job || (c & 0xffff) >= ((c >> 16) & 0xffff))
      return -1;
    if (atomic_compare_exchange_weak(&pool.claim, &c, c + 1))
      return (int)(c & 0xffff);
  }
}

/* Runs the blocks of job `job` this thread claims. fn, ctx, enter and leave are read before the
   first claim: a claim that succeeds proves the job still posted, so they were its own. */
static void run_claimed(uint32_t job, block_fn fn, const void *ctx, thread_fn enter,
                        thread_fn leave) {
  int n = 0;
  for (int i; (i = claim(job)) >= 0; n++) {
    if (!n)
      enter();
    fn(ctx, i);
    atomic_fetch_add(&pool.done, 1);
    if (atomic_load(&pool.waiting))
      futex(&pool.done, FUTEX_WAKE, 1);
  }
  if (n)
    leave();
}

static void *helper_main(void *arg) {
  const int me = (int)(intptr_t)arg;
  uint32_t seen = 0;
  for (;;) {
    seen = wait_change(&pool.go, seen, &pool.sleepers);
    if (me < atomic_load(&pool.invited))
      run_claimed(seen, atomic_load(&pool.fn), atomic_load(&pool.ctx), atomic_load(&pool.enter),
                  atomic_load(&pool.leave));
  }
  return NULL;
}

/* Helpers up to n (called with pool_lock held); how many run. */
static int start_helpers(int n) {
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old); /* signals stay with the process's own threads */
  while (pool.started < n) {
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int err = pthread_create(&t, &attr, helper_main, (void *)(intptr_t)pool.started);
    pthread_attr_destroy(&attr);
    if (err)
      break; /* fewer helpers: the caller runs what they do not */
    pool.started++;
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return pool.started;
}

/* A forked child has none of its parent's helper threads. */
static void forget_helpers(void) {
  memset(&pool, 0, sizeof pool);
  pthread_mutex_init(&pool_lock, NULL);
}
static pthread_once_t fork_hook = PTHREAD_ONCE_INIT;
static void install_fork_hook(void) { pthread_atfork(NULL, NULL, forget_helpers); }

/* fn(ctx, i) for every block i < blocks, on `threads` threads at most (this one and helpers);
   each thread calls enter() before its first block and leave() after its last. Returns when
   every block has run. */
static void run_blocks(int blocks, int threads, block_fn fn, const void *ctx, thread_fn enter,
                       thread_fn leave) {
  int helpers = (threads < blocks ? threads : blocks) - 1;
  helpers = helpers < MAX_HELPERS ? helpers : MAX_HELPERS;
  if (helpers < 1 || blocks > 0xffff || pthread_mutex_trylock(&pool_lock) != 0) {
    enter();
    for (int i = 0; i < blocks; i++)
      fn(ctx, i);
    leave();
    return;
  }
  pthread_once(&fork_hook, install_fork_hook);
  const int running = start_helpers(helpers);
  helpers = running < helpers ? running : helpers;
  const uint32_t job = atomic_load(&pool.go) + 1;
  atomic_store(&pool.fn, fn);
  atomic_store(&pool.ctx, ctx);
  atomic_store(&pool.enter, enter);
  atomic_store(&pool.leave, leave);
  atomic_store(&pool.done, 0);
  atomic_store(&pool.invited, helpers);
  atomic_store(&pool.claim, (uint64_t)job << 32 | (uint64_t)blocks << 16);
  atomic_store(&pool.go, job);
  if (atomic_load(&pool.sleepers))
    futex(&pool.go, FUTEX_WAKE, INT_MAX);
  run_claimed(job, fn, ctx, enter, leave);
  for (uint32_t d; (d = atomic_load(&pool.done)) != (uint32_t)blocks;)
    wait_change(&pool.done, d, &pool.waiting); /* blocks a helper claimed, still running */
  pthread_mutex_unlock(&pool_lock);
}
