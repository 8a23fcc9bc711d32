"""How long an intention takes to be enforced: writes it on the control
plane, then calls the meshed service through the consumer's proxy until
the answer says it is in force (403 after a deny, 200 after an allow).

    python3 bench/mesh_propagation.py CP_URL SERVICE_URL SOURCE DESTINATION N

Prints the p50, p99 and max of 2N changes (N denies, N allows), in ms,
from the write's start (its fsync included) to the first answer that
obeys it; the polling makes one request every few hundred microseconds.
"""

import json
import sys
import time
import urllib.error
import urllib.request


def main():
    cp, url, source, destination, n = sys.argv[1:6]
    path = f"{cp}/v1/connect/intentions/exact?source={source}&destination={destination}"

    def write(action):
        body = json.dumps({"Action": action}).encode()
        request = urllib.request.Request(path, data=body, method="PUT")
        urllib.request.urlopen(request, timeout=10).read()

    def status():
        try:
            return urllib.request.urlopen(url, timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    samples = []
    for _ in range(int(n)):
        for action, wanted in (("deny", 403), ("allow", 200)):
            started = time.monotonic()
            write(action)
            while status() != wanted:
                if time.monotonic() - started > 30:
                    sys.exit(f"{action} not in force after 30 s")
            samples.append((time.monotonic() - started) * 1000)
            time.sleep(0.2)
    samples.sort()
    p = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]
    print(f"{len(samples)} {p(0.5):.1f} {p(0.99):.1f} {samples[-1]:.1f}")


if __name__ == "__main__":
    main()
