# Keel's two entry points (see README.md):
#   make demo   set up, build, and run Keel's main job
#   make check  set up, build, and run every test
# Both install missing Debian packages first (scripts/setup.sh, idempotent) and build the guest kit.

BUILD_DIR ?= build
ASAN_BUILD_DIR ?= build-asan
JOBS ?= $(shell nproc)

.PHONY: all setup build build-asan guest demo check check-fast clean

all: build

setup:
	@bash scripts/setup.sh

build: setup
	@cmake -S . -B $(BUILD_DIR) -G Ninja -DKEEL_WERROR=ON >/dev/null
	@ninja -C $(BUILD_DIR) -j $(JOBS)

# Unit tests and fuzz corpora again under AddressSanitizer + UndefinedBehaviorSanitizer, built with
# clang so that both supported compilers build the tree on every check.
build-asan: setup
	@cmake -S . -B $(ASAN_BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Asan -DKEEL_WERROR=ON \
	  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ >/dev/null
	@ninja -C $(ASAN_BUILD_DIR) -j $(JOBS) sanitized-tests

guest: build
	@bash guest/build.sh

demo: build guest
	@bash scripts/demo.sh $(BUILD_DIR)

check: build build-asan guest
	@bash scripts/check.sh $(BUILD_DIR) $(ASAN_BUILD_DIR)

# Unit tests only, in the normal build: the quick loop while developing.
check-fast: build
	@ctest --test-dir $(BUILD_DIR) -L unit --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD_DIR) $(ASAN_BUILD_DIR)
