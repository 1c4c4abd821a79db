/* Every para-call with its return values: DUMP_PROCESSOR_STATE, a SNAPSHOT that fails and
 * one that works (the copy restored from it sees 1 and exits 7, the original exits 3), and
 * MIGRATE to argv[1] if given (1 on the destination, which exits 9; under --live 0 here at
 * once, then 60 ticks that go on at the destination, which exits 11). */
#include <stdio.h>
#include <unistd.h>
#include "../../examples/vmstate_paracalls.h"

static void say(const char *what, long value)
{
    printf("%s=%ld\n", what, value);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    static char marker[] = "original";
    say("dump", vmstate_dump_processor_state());
    say("bad-snapshot", vmstate_snapshot("no/such/dir/x.sav"));
    say("fault-snapshot", vmstate_snapshot((const char *)16));
    long snapshot = vmstate_snapshot("snap.sav");
    say("snapshot", snapshot);
    if (snapshot == VMSTATE_RESTORED) {
        printf("restored copy, marker %s\n", marker);
        return 7;
    }
    marker[0] = 'O';             /* after the snapshot: the copy must not see it */
    if (argc > 1) {
        long migrated = vmstate_migrate(argv[1]);
        say("migrate", migrated);
        if (migrated == VMSTATE_RESTORED)
            return 9;
        if (migrated == 0) {     /* under --live: it migrates while this goes on */
            for (int i = 0; i < 60; i++) {
                printf("live tick %d\n", i);
                fflush(stdout);
                usleep(50000);     /* 3 s in all: the hand-over comes first */
            }
            return 11;
        }
    }
    printf("original goes on, marker %s\n", marker);
    return 3;
}
