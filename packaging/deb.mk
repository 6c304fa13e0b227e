# The Debian packages (make deb), one per release, each built in a clean root
# of its release, and their tests in a VM of that release (make vm-test).
# DIST=bookworm or DIST=trixie for one. Included by the Makefile.
DEB_VERSION := $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' packaging/debian/changelog)
DEB_ARCH := $(shell dpkg --print-architecture)
DEB_DISTS := $(or $(DIST),bookworm trixie)
deb_suffix = $(if $(filter bookworm,$1),deb12,$(if $(filter trixie,$1),deb13,$(error DIST=$1: bookworm or trixie)))
deb_file = dist/unitbox_$(DEB_VERSION)~$(call deb_suffix,$1)_$(DEB_ARCH).deb
DEBS := $(foreach d,$(DEB_DISTS),$(call deb_file,$d))
# The package the upgrade test starts from: 0.1.0 as landed, built from its commit.
DEB_PREVIOUS_COMMIT := 2bc55b6
DEB_PREVIOUS := .cache/deb-previous/unitbox_0.1.0_$(DEB_ARCH).deb
WHEELHOUSE := .cache/wheelhouse
# The Pythons of the releases: the wheelhouse holds wheels for each.
WHEEL_PYTHONS := 3.11 3.13
WHEEL_PLATFORMS := $(foreach v,5 12 17 28 31 34,--platform manylinux_2_$(v)_x86_64)
HOST_APT_PACKAGES := debootstrap python3-venv git
VM_APT_PACKAGES := qemu-system-x86 qemu-utils debootstrap e2fsprogs openssh-client
VM_PYTEST_ARGS ?=

.PHONY: deb deb-deps wheelhouse vm-deps vm-image vm-test vm-dev-test deb-clean FORCE

define apt_ensure
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "==> apt-get install" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	else echo "==> Debian packages present: $(1)"; fi
endef

deb-deps:  ## install what builds the .debs here (debootstrap; the rest is in each release's build root)
	$(call apt_ensure,$(HOST_APT_PACKAGES))

vm-deps:  ## install qemu, debootstrap and what the VM tests need
	$(call apt_ensure,$(VM_APT_PACKAGES) curl)

wheelhouse: $(WHEELHOUSE)/.complete  ## download the pinned wheels (for each release's Python) and pystemd's sdist
$(WHEELHOUSE)/.complete: packaging/requirements.txt packaging/build-requirements.txt
	$(call apt_ensure,python3-venv git)
	@echo "==> pip for downloading: .cache/pip-download (python3 -m venv)"
	@test -x .cache/pip-download/bin/pip || python3 -m venv .cache/pip-download
	@rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	@git show $(DEB_PREVIOUS_COMMIT):packaging/requirements.txt > .cache/requirements-previous.txt
	@for py in $(WHEEL_PYTHONS); do \
	  echo "==> downloading the wheelhouse for Python $$py into $(WHEELHOUSE) (packaging/*requirements.txt, and 0.1.0's)"; \
	  for req in packaging/build-requirements.txt packaging/requirements.txt .cache/requirements-previous.txt; do \
	    .cache/pip-download/bin/pip download --disable-pip-version-check -q -d $(WHEELHOUSE) --no-deps \
	      --python-version $$py --implementation cp --abi cp$${py/./} $(WHEEL_PLATFORMS) \
	      --only-binary :all: --no-binary pystemd -r $$req || exit 1; \
	  done; \
	done
	@ls $(WHEELHOUSE) | sed 's/^/    /'
	@touch $@

# A build root is remade only when its recipe changes; its stamp then changes
# and so do the packages built in it.
.cache/buildroot-%.stamp: FORCE | deb-deps
	@nice -n 10 bash packaging/buildroot.sh ensure $*

deb: $(DEBS)  ## build dist/unitbox_<version>~deb12 and ~deb13_<arch>.deb, each in its release's root, and lintian them
DEB_INPUTS := $(shell find daemon/unitbox packaging units -type f ! -name '*.pyc' ! -path '*/__pycache__/*' 2>/dev/null) \
	pyproject.toml README.md SECURITY.md $(wildcard docs/*.md)
define deb_rule
$(call deb_file,$1): $(WHEELHOUSE)/.complete .cache/buildroot-$1.stamp $(DEB_INPUTS) $(PLAYGROUND)
	@echo "==> checking versions: debian/changelog $(DEB_VERSION), pyproject.toml $$$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
	@[ "$(DEB_VERSION)" = "$$$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)" ] || \
	    { echo "packaging/debian/changelog and pyproject.toml disagree on the version" >&2; exit 1; }
	@nice -n 10 bash packaging/build-deb.sh $1 $(call deb_suffix,$1) . $$@
endef
$(foreach d,bookworm trixie,$(eval $(call deb_rule,$d)))

$(DEB_PREVIOUS): $(WHEELHOUSE)/.complete .cache/buildroot-bookworm.stamp
	@echo "==> the previous package: unitbox 0.1.0 from commit $(DEB_PREVIOUS_COMMIT) (git archive), for the upgrade test"
	@rm -rf .cache/deb-previous && mkdir -p .cache/deb-previous/src
	@git archive $(DEB_PREVIOUS_COMMIT) daemon units packaging pyproject.toml README.md SECURITY.md docs \
	    | tar -x -C .cache/deb-previous/src
	@nice -n 10 bash packaging/build-deb.sh bookworm "" .cache/deb-previous/src $@

# The development tier in the Debian 13 VM (tests/vm/test_the_development_tier.py)
# installs the checkout's test venv offline from these: the Python 3.13 wheels
# of the daemon's and the tests' dependencies (and pystemd's: lxml, psutil), pystemd
# built in the trixie root. Playwright ships manylinux1 wheels only, a tag pip
# does not derive from manylinux_2_5.
DEV_WHEELS := .cache/devwheels-cp313
$(DEV_WHEELS)/.complete: pyproject.toml $(WHEELHOUSE)/.complete .cache/buildroot-trixie.stamp
	@echo "==> the test venv's wheels for Python 3.13 (Debian 13) into $(DEV_WHEELS)"
	@rm -rf $(DEV_WHEELS) .cache/devbuild && mkdir -p $(DEV_WHEELS) .cache/devbuild
	@.cache/pip-download/bin/pip download --disable-pip-version-check -q -d $(DEV_WHEELS) \
	    --python-version 3.13 --implementation cp --abi cp313 $(WHEEL_PLATFORMS) --platform manylinux1_x86_64 --only-binary :all: \
	    $$(python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
	        print(*(d for d in p["build-system"]["requires"] + p["project"]["dependencies"] \
	                + p["project"]["optional-dependencies"]["test"] if not d.startswith("pystemd")))') lxml psutil pip
	@cp -r $(WHEELHOUSE) .cache/devbuild/wheelhouse
	@bash packaging/buildroot.sh run trixie .cache/devbuild sh -c 'python3 -m venv --without-pip /tmp/v && \
	    P="/tmp/v/bin/python $$(ls wheelhouse/pip-*.whl)/pip --isolated --no-cache-dir" && \
	    $$P install -q --no-index -f wheelhouse setuptools wheel cython && \
	    $$P wheel -q --no-index --no-build-isolation --no-deps -f wheelhouse -w out pystemd==$(PYSTEMD_VERSION)'
	@cp .cache/devbuild/out/pystemd-*.whl $(DEV_WHEELS)/ && rm -rf .cache/devbuild
	@echo "    $$(ls $(DEV_WHEELS) | wc -l) wheels" && touch $@
PYSTEMD_VERSION = $(shell sed -n 's/^pystemd==//p' packaging/requirements.txt)

vm-image: vm-deps  ## build (once per recipe; cached in .cache/vm/<dist>) the VM image of each release
	@for dist in $(DEB_DISTS); do nice -n 10 bash tests/vm/image.sh $$dist || exit 1; done

vm-test: deb $(if $(filter bookworm,$(DEB_DISTS)),$(DEB_PREVIOUS)) vm-image venv  ## the operator story in a Debian 12 VM and a Debian 13 VM (qemu), each with its own .deb
	@for dist in $(DEB_DISTS); do \
	  echo "==> pytest -m vm tests/vm on $$dist (boots its VM: qemu, $$(bash tests/vm/vm.sh accel))"; \
	  UNITBOX_VM_TEST=1 UNITBOX_VM_DIST=$$dist UNITBOX_DEB_PREVIOUS=$(DEB_PREVIOUS) \
	    UNITBOX_DEBS="$(call deb_file,bookworm) $(call deb_file,trixie)" \
	    $(BIN)/pytest -m vm -v -s -p no:cacheprovider tests/vm $(VM_PYTEST_ARGS) || exit 1; \
	done
	@bash tests/vm/vm.sh check-clean

# No package: the tier installs the checkout (a deb prerequisite also built
# the bookworm one, its list being made before DEB_DISTS := trixie applies).
vm-dev-test: DEB_DISTS := trixie
vm-dev-test: $(DEV_WHEELS)/.complete vm-image venv  ## development on Debian 13: make test-fast and an integration smoke (test host on pure cgroup v2) in the trixie VM
	@echo "==> pytest -m vm tests/vm/test_the_development_tier.py on trixie (boots its VM: qemu, $$(bash tests/vm/vm.sh accel))"
	@UNITBOX_VM_TEST=1 UNITBOX_VM_DEV=1 UNITBOX_VM_DIST=trixie \
	    $(BIN)/pytest -m vm -v -s -p no:cacheprovider tests/vm/test_the_development_tier.py $(VM_PYTEST_ARGS)
	@bash tests/vm/vm.sh check-clean

deb-clean:  ## remove the built packages, the wheelhouse, the build roots and the VM images
	@for root in .cache/buildroot-*/; do [ -d "$$root" ] && bash -c '. packaging/bootstrap.sh; umount_under "$$1"' _ "$$root"; done; true
	rm -rf .cache/deb-build .cache/deb-previous $(WHEELHOUSE) .cache/pip-download .cache/buildroot-* .cache/debs .cache/vm dist/unitbox_*.deb
